//! VM configuration: CLI flags and the Firecracker-shaped JSON file.
//!
//! A Firecracker config file's `boot-source` and `machine-config` sections are
//! accepted unchanged (same field names, same meaning). Other Firecracker
//! top-level sections that foliovm does not implement yet are ignored with a
//! warning; keys nobody knows are an error.

use serde::Deserialize;
use std::path::PathBuf;

/// Errors from parsing or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size string such as `512M` could not be parsed.
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (plain numbers are MiB)")]
    BadSize(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON or has wrong field types or unknown fields.
    #[error("malformed config file {path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// serde's description, with line and column.
        message: String,
    },
    /// A value is out of range or a required value is missing.
    #[error("{0}")]
    Invalid(String),
}

/// What the guest runs.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestPayload {
    /// A Linux kernel image (ELF vmlinux or bzImage).
    Linux {
        /// Kernel image path.
        kernel: PathBuf,
        /// Optional initrd / initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line; `None` means foliovm's default.
        cmdline: Option<String>,
    },
    /// The built-in workload guest with the given spec (see `workload::WorkloadSpec`).
    Workload(String),
}

/// Which host memory backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemBackendKind {
    /// foliovm's memory manager: pool, large folios, userfaultfd.
    #[default]
    Folio,
    /// Plain anonymous memory; the kernel serves faults (benchmark baseline).
    Anon,
}

impl std::str::FromStr for MemBackendKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "folio" => Ok(MemBackendKind::Folio),
            "anon" => Ok(MemBackendKind::Anon),
            other => Err(ConfigError::Invalid(format!(
                "unknown memory backend {other:?}: expected folio or anon"
            ))),
        }
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// What to run.
    pub payload: GuestPayload,
    /// Guest RAM in bytes, a multiple of 4 KiB.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory backend.
    pub mem_backend: MemBackendKind,
    /// Host memory budget of the memory manager in bytes (`None`: the
    /// guest's memory size). Only for the folio backend.
    pub mem_budget: Option<u64>,
    /// Drives and balloon.
    pub virtio: crate::virtio::VirtioConfig,
}

/// Parse a size: `4096K`, `512M`, `2G`, `1T`; a plain number means MiB (as QEMU's `-m`).
/// A `B` suffix means bytes.
///
/// # Errors
/// [`ConfigError::BadSize`] if the string is not a number with a known suffix or overflows.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        Some(_) => (t, 1 << 20),
        None => return Err(bad()),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Limits the host imposes, passed in so validation is testable.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Host RAM in bytes (MemTotal).
    pub host_mem_bytes: u64,
    /// The most vCPUs KVM and our MP table allow.
    pub max_vcpus: u32,
}

impl VmConfig {
    /// Check the configuration against itself and the host.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the offending value.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.mem_bytes == 0 {
            return Err(ConfigError::Invalid(
                "memory size must be greater than 0".into(),
            ));
        }
        if !self.mem_bytes.is_multiple_of(4096) {
            return Err(ConfigError::Invalid(format!(
                "memory size {} is not a multiple of 4 KiB",
                self.mem_bytes
            )));
        }
        if self.mem_bytes > limits.host_mem_bytes {
            return Err(ConfigError::Invalid(format!(
                "memory size {} MiB exceeds the host's {} MiB",
                self.mem_bytes >> 20,
                limits.host_mem_bytes >> 20
            )));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::Invalid("vCPU count must be at least 1".into()));
        }
        if let Some(b) = self.mem_budget {
            if self.mem_backend != MemBackendKind::Folio {
                return Err(ConfigError::Invalid(
                    "a memory budget needs the folio memory backend".into(),
                ));
            }
            if b < 2 << 20 || b % 4096 != 0 {
                return Err(ConfigError::Invalid(format!(
                    "memory budget {b} must be at least 2 MiB and a multiple of 4 KiB"
                )));
            }
            if b > limits.host_mem_bytes {
                return Err(ConfigError::Invalid(format!(
                    "memory budget {} MiB exceeds the host's {} MiB",
                    b >> 20,
                    limits.host_mem_bytes >> 20
                )));
            }
        }
        if u32::from(self.vcpus) > limits.max_vcpus {
            return Err(ConfigError::Invalid(format!(
                "vCPU count {} exceeds the maximum of {}",
                self.vcpus, limits.max_vcpus
            )));
        }
        self.virtio.validate(self.mem_bytes)
    }
}

// ---- Firecracker-shaped JSON -------------------------------------------------

/// Firecracker's `boot-source` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Path of the kernel image.
    pub kernel_image_path: PathBuf,
    /// Kernel command line.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Path of the initrd.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

/// Firecracker's `machine-config` section. `smt`, `cpu_template`,
/// `track_dirty_pages` and `huge_pages` are accepted for compatibility.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (Firecracker: 1..=32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Accepted; SMT topology is not exposed (vCPUs are separate cores).
    #[serde(default)]
    pub smt: bool,
    /// Accepted and ignored; foliovm uses KVM's supported CPUID.
    #[serde(default)]
    pub cpu_template: Option<serde_json::Value>,
    /// Accepted; dirty tracking is not implemented.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Accepted: `None` or `2M` (foliovm always prefers 2 MiB folios).
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// foliovm's own optional section.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FoliovmSection {
    /// Run the built-in workload guest instead of `boot-source`.
    #[serde(default)]
    pub workload: Option<String>,
    /// `folio` (default) or `anon`.
    #[serde(default)]
    pub mem_backend: Option<MemBackendKind>,
    /// Host memory budget, e.g. `"384M"`.
    #[serde(default)]
    pub mem_budget: Option<String>,
}

/// The whole file. Unknown top-level keys land in `ignored` and are checked
/// by [`ConfigFile::parse`] (serde cannot combine `flatten` with
/// `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
pub struct ConfigFile {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// foliovm extensions.
    #[serde(default)]
    pub foliovm: Option<FoliovmSection>,
    /// Firecracker's drives.
    #[serde(default)]
    pub drives: Vec<crate::virtio::DriveSection>,
    /// Firecracker's balloon.
    #[serde(default)]
    pub balloon: Option<crate::virtio::BalloonSection>,
    /// Firecracker sections foliovm does not implement yet; warned about.
    #[serde(flatten)]
    pub ignored: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Firecracker top-level sections that are accepted but not implemented.
const FIRECRACKER_SECTIONS: &[&str] = &[
    "network-interfaces",
    "logger",
    "metrics",
    "vsock",
    "mmds-config",
    "entropy",
    "cpu-config",
];

impl ConfigFile {
    /// Parse a config file's text. `path` only labels errors.
    ///
    /// # Errors
    /// [`ConfigError::Malformed`] for bad JSON, wrong types or unknown keys;
    /// [`ConfigError::Invalid`] for a missing payload or out-of-range numbers.
    pub fn parse(
        text: &str,
        path: &std::path::Path,
    ) -> Result<(VmConfig, Vec<String>), ConfigError> {
        let malformed = |message: String| ConfigError::Malformed {
            path: path.to_path_buf(),
            message,
        };
        let file: ConfigFile = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        let mut warnings = Vec::new();
        for key in file.ignored.keys() {
            if FIRECRACKER_SECTIONS.contains(&key.as_str()) {
                warnings.push(format!(
                    "config section {key:?} is not supported yet and is ignored"
                ));
            } else {
                return Err(malformed(format!("unknown top-level key {key:?}")));
            }
        }
        let mc = &file.machine_config;
        if let Some(hp) = mc.huge_pages.as_deref() {
            if hp != "None" && hp != "2M" {
                return Err(malformed(format!(
                    "machine-config.huge_pages must be \"None\" or \"2M\", not {hp:?}"
                )));
            }
        }
        let vcpus = u8::try_from(mc.vcpu_count).map_err(|_| {
            ConfigError::Invalid(format!(
                "vCPU count {} exceeds the maximum of 254",
                mc.vcpu_count
            ))
        })?;
        let mem_bytes = mc.mem_size_mib.checked_mul(1 << 20).ok_or_else(|| {
            ConfigError::Invalid(format!("mem_size_mib {} is too large", mc.mem_size_mib))
        })?;
        let virtio = crate::virtio::from_sections(file.drives, file.balloon, &mut warnings)?;
        let fv = file.foliovm.unwrap_or_default();
        let mem_budget = fv.mem_budget.as_deref().map(parse_size).transpose()?;
        let mem_backend = fv.mem_backend.unwrap_or_default();
        let workload = fv.workload;
        let payload = match (file.boot_source, workload) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "config has both boot-source and foliovm.workload; choose one".into(),
                ))
            }
            (Some(bs), None) => GuestPayload::Linux {
                kernel: bs.kernel_image_path,
                initrd: bs.initrd_path,
                cmdline: bs.boot_args,
            },
            (None, Some(w)) => GuestPayload::Workload(w),
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "config needs a boot-source section (or foliovm.workload)".into(),
                ))
            }
        };
        Ok((
            VmConfig {
                payload,
                mem_bytes,
                vcpus,
                mem_backend,
                mem_budget,
                virtio,
            },
            warnings,
        ))
    }

    /// Read and parse a config file.
    ///
    /// # Errors
    /// As [`ConfigFile::parse`], plus [`ConfigError::Read`].
    pub fn load(path: &std::path::Path) -> Result<(VmConfig, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// Host RAM from /proc/meminfo.
///
/// # Errors
/// [`ConfigError::Invalid`] if /proc/meminfo cannot be read or parsed.
pub fn host_mem_bytes() -> Result<u64, ConfigError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| ConfigError::Invalid(format!("cannot read /proc/meminfo: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| ConfigError::Invalid("no MemTotal in /proc/meminfo".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const LIMITS: HostLimits = HostLimits {
        host_mem_bytes: 8 << 30,
        max_vcpus: 32,
    };

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "18446744073709551615T",
        ] {
            assert!(
                matches!(parse_size(bad), Err(ConfigError::BadSize(_))),
                "{bad}"
            );
        }
    }

    fn cfg(mem: u64, vcpus: u8) -> VmConfig {
        VmConfig {
            payload: GuestPayload::Workload("seq:1M".into()),
            mem_bytes: mem,
            vcpus,
            mem_backend: MemBackendKind::Anon,
            mem_budget: None,
            virtio: Default::default(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(cfg(512 << 20, 2).validate(&LIMITS).is_ok());
        let e = cfg(0, 1).validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("greater than 0"), "{e}");
        let e = cfg(16 << 30, 1).validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("exceeds the host"), "{e}");
        let e = cfg(1 << 20, 0).validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        let e = cfg(1 << 20, 33).validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("maximum of 32"), "{e}");
        let e = cfg(4097, 1).validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("multiple of 4 KiB"), "{e}");
    }

    #[test]
    fn budget_rules() {
        let mut c = cfg(512 << 20, 1);
        c.mem_budget = Some(256 << 20);
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("needs the folio memory backend"), "{e}");
        c.mem_backend = MemBackendKind::Folio;
        assert!(c.validate(&LIMITS).is_ok());
        c.mem_budget = Some(4096);
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("at least 2 MiB"));
        c.mem_budget = Some(64 << 30);
        assert!(c
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("exceeds the host"));
        let (c, _) = ConfigFile::parse(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "foliovm": {"workload": "seq:1M", "mem_backend": "folio", "mem_budget": "32M"}}"#,
            Path::new("x.json"),
        )
        .unwrap();
        assert_eq!(
            (c.mem_backend, c.mem_budget),
            (MemBackendKind::Folio, Some(32 << 20))
        );
        let e = ConfigFile::parse(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                "foliovm": {"workload": "seq:1M", "mem_backend": "tmpfs"}}"#,
            Path::new("x.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `tmpfs`"), "{e}");
        assert!("anon".parse::<MemBackendKind>().is_ok());
        assert!("x".parse::<MemBackendKind>().is_err());
    }

    #[test]
    fn firecracker_file_parses_unchanged() {
        // The shape of Firecracker's docs/getting-started example.
        let text = r#"{
          "boot-source": {
            "kernel_image_path": "vmlinux.bin",
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            "initrd_path": null
          },
          "drives": [],
          "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 1024,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None"
          },
          "network-interfaces": []
        }"#;
        let (c, warnings) = ConfigFile::parse(text, Path::new("vm.json")).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.mem_bytes, 1024 << 20);
        assert_eq!(
            c.payload,
            GuestPayload::Linux {
                kernel: "vmlinux.bin".into(),
                initrd: None,
                cmdline: Some("console=ttyS0 reboot=k panic=1 pci=off".into()),
            }
        );
        // `network-interfaces` is warned about; `drives` is implemented.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn malformed_files_are_rejected_clearly() {
        let p = Path::new("bad.json");
        let cases: &[(&str, &str)] = &[
            ("{", "malformed"),
            (r#"{"machine-config": {"vcpu_count": 1}}"#, "mem_size_mib"),
            (
                r#"{"machine-config": {"vcpu_count": "two", "mem_size_mib": 1}}"#,
                "invalid type",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 3}, "foliovm": {"workload": "seq:1M"}}"#,
                "unknown field",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "bogus": 1}"#,
                "unknown top-level key",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
                "boot-source",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 300, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#,
                "exceeds the maximum",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "1G"}, "foliovm": {"workload": "seq:1M"}}"#,
                "huge_pages",
            ),
        ];
        for (text, want) in cases {
            let e = ConfigFile::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn host_memory_is_readable() {
        assert!(host_mem_bytes().unwrap() > 64 << 20);
    }
}
