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
    /// A size string is well formed but does not fit in 64 bits of bytes.
    #[error("size {0:?} is too large")]
    SizeTooLarge(String),
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
        /// What is wrong: serde's description (with line and column when
        /// it has them), in a `vms` list after the VM it is about.
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

/// Whether `name` can name a VM: 1 to 64 characters of ASCII letters,
/// digits, `-`, `_` and `.`, so that it is one segment of an API path, a
/// thread name and a Prometheus label value as it is.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// One VM's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Name, unique in the process (`vm0` for a single VM).
    pub name: String,
    /// What to run.
    pub payload: GuestPayload,
    /// Guest RAM in bytes, a multiple of 4 KiB.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Reclaim limits: minimum resident memory, optional maximum, priority
    /// (folio backend with swap).
    pub limits: mem::VmLimits,
    /// Drives and balloon.
    pub virtio: crate::virtio::VirtioConfig,
}

/// How the process backs guest memory; shared by all its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryConfig {
    /// Guest memory backend.
    pub backend: MemBackendKind,
    /// Host memory budget of the memory manager in bytes (`None`: the sum
    /// of the VMs' memory). Only for the folio backend.
    pub budget: Option<u64>,
    /// The swap file that lets guests' memory exceed the budget.
    pub swap: Option<mem::SwapConfig>,
}

/// Everything one `foliovm run` does: one or more VMs sharing memory settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The VMs, in start order.
    pub vms: Vec<VmConfig>,
    /// Memory settings for all of them.
    pub memory: MemoryConfig,
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
    let digits = num.trim();
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(ConfigError::SizeTooLarge(s.to_string()))
        }
        Err(_) => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::SizeTooLarge(s.to_string()))
}

/// The first of a flag's comma-separated options whose `key` repeats an
/// earlier option's (`key=value` options are keyed by `key`): refused by
/// the flag parsers rather than letting the last one win.
pub fn repeated_option<'a>(opts: &[&'a str], key: impl Fn(&'a str) -> &'a str) -> Option<&'a str> {
    let keys: Vec<&str> = opts.iter().map(|&o| key(o)).collect();
    (1..opts.len())
        .find(|&i| keys[..i].contains(&keys[i]))
        .map(|i| opts[i])
}

/// An option's key: the part before `=`, or all of it.
pub fn option_key(opt: &str) -> &str {
    opt.split_once('=').map_or(opt, |(k, _)| k)
}

/// [`parse_size`] for the setting `what`, which a refusal names.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `what`.
pub fn parse_size_of(what: &str, s: &str) -> Result<u64, ConfigError> {
    parse_size(s).map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))
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
        if !valid_vm_name(&self.name) {
            return Err(ConfigError::Invalid(format!(
                "VM name {:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.' \
                 (the API addresses VMs by name in its paths)",
                self.name
            )));
        }
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
        if u32::from(self.vcpus) > limits.max_vcpus {
            return Err(ConfigError::Invalid(format!(
                "vCPU count {} exceeds the maximum of {}",
                self.vcpus, limits.max_vcpus
            )));
        }
        check_limits(&self.limits, self.mem_bytes)?;
        // A workload that does not fit is refused here, where a config
        // file's error names the VM, rather than when the VM is built.
        if let GuestPayload::Workload(w) = &self.payload {
            let spec: crate::workload::WorkloadSpec = w
                .parse()
                .map_err(|e: crate::workload::SpecError| ConfigError::Invalid(e.to_string()))?;
            crate::workload::WorkloadLayout::plan(&spec, self.vcpus, self.mem_bytes)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        self.virtio.validate(self.mem_bytes)
    }
}

/// `bytes` for a message: in MiB when whole, else in KiB or bytes.
pub fn show_size(bytes: u64) -> String {
    mem::ShowSize(bytes).to_string()
}

/// Check per-VM reclaim limits against the VM's size.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the offending value.
pub fn check_limits(l: &mem::VmLimits, mem_bytes: u64) -> Result<(), ConfigError> {
    if l.min_bytes > mem_bytes {
        return Err(ConfigError::Invalid(format!(
            "mem_min {} exceeds the VM's {}",
            show_size(l.min_bytes),
            show_size(mem_bytes)
        )));
    }
    if let Some(max) = l.max_bytes {
        if max < l.min_bytes || max < 2 << 20 {
            return Err(ConfigError::Invalid(format!(
                "mem_max {} must be at least 2 MiB and at least mem_min",
                show_size(max)
            )));
        }
    }
    Ok(())
}

/// A budget, at start or at run time, is whole 2 MiB blocks.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the budget.
pub fn check_budget_blocks(b: u64) -> Result<(), ConfigError> {
    // The pool is made of 2 MiB blocks; rounding up would let the VMs use
    // more host memory than asked, rounding down less.
    if b < 2 << 20 || !b.is_multiple_of(2 << 20) {
        return Err(ConfigError::Invalid(format!(
            "memory budget {} must be a whole number of 2 MiB blocks (at least one)",
            show_size(b)
        )));
    }
    Ok(())
}

impl MemoryConfig {
    /// Check the budget against the backend and the host.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the offending value.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.swap.is_some() && self.backend != MemBackendKind::Folio {
            return Err(ConfigError::Invalid(
                "a swap file needs the folio memory backend".into(),
            ));
        }
        let Some(b) = self.budget else {
            return Ok(());
        };
        if self.backend != MemBackendKind::Folio {
            return Err(ConfigError::Invalid(
                "a memory budget needs the folio memory backend".into(),
            ));
        }
        check_budget_blocks(b)?;
        if b > limits.host_mem_bytes {
            return Err(ConfigError::Invalid(format!(
                "memory budget {} MiB exceeds the host's {} MiB",
                b >> 20,
                limits.host_mem_bytes >> 20
            )));
        }
        Ok(())
    }
}

impl RunConfig {
    /// One VM named `vm0` with default memory settings.
    pub fn single(vm: VmConfig, memory: MemoryConfig) -> Self {
        RunConfig {
            vms: vec![vm],
            memory,
        }
    }

    /// Check every VM, the memory settings and the names.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the VM and the offending value.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        if self.vms.is_empty() {
            return Err(ConfigError::Invalid("no VMs to run".into()));
        }
        self.memory.validate(limits)?;
        let many = self.vms.len() > 1;
        for (i, vm) in self.vms.iter().enumerate() {
            if self.vms[..i].iter().any(|o| o.name == vm.name) {
                return Err(ConfigError::Invalid(format!(
                    "two VMs are named {:?}",
                    vm.name
                )));
            }
            let limited = vm.limits != mem::VmLimits::default();
            let checked = if limited && self.memory.backend != MemBackendKind::Folio {
                Err(ConfigError::Invalid(
                    "mem_min, mem_max and priority need the folio memory backend".into(),
                ))
            } else {
                vm.validate(limits)
            };
            checked.map_err(|e| match e {
                ConfigError::Invalid(m) if many => {
                    ConfigError::Invalid(format!("VM {:?}: {m}", vm.name))
                }
                other => other,
            })?;
        }
        self.check_shared_images()?;
        // Reclaim never takes a VM below its minimum: minimums that fill
        // the budget leave no VM room to fault beyond its own.
        let mins: u64 = self.vms.iter().map(|v| v.limits.min_bytes).sum();
        if let Some(b) = self.memory.budget.filter(|&b| mins > b) {
            return Err(ConfigError::Invalid(format!(
                "the VMs' mem_min add up to {}, more than the memory budget of {}",
                show_size(mins),
                show_size(b)
            )));
        }
        Ok(())
    }

    /// Refuse one image file behind two drives when either is writable:
    /// two virtio-blk devices over one file, each with a guest cache and
    /// filesystem of its own, corrupt it. Files are compared by device and
    /// inode, so a hard link or symlink is the same file; an image that
    /// cannot be looked at is left to the open, which names the problem.
    fn check_shared_images(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let many = self.vms.len() > 1;
        let mut seen: Vec<((u64, u64), &VmConfig, &crate::virtio::DriveConfig)> = Vec::new();
        for vm in &self.vms {
            for d in &vm.virtio.drives {
                let Ok(m) = std::fs::metadata(&d.path) else {
                    continue;
                };
                let key = (m.dev(), m.ino());
                let name = |v: &VmConfig, d: &crate::virtio::DriveConfig| match many {
                    true => format!("VM {:?} drive {:?}", v.name, d.id),
                    false => format!("drive {:?}", d.id),
                };
                if let Some((_, ov, od)) = seen
                    .iter()
                    .find(|(k, _, od)| *k == key && !(od.read_only && d.read_only))
                {
                    let (first, second) = (name(ov, od), name(vm, d));
                    let both = if many {
                        format!("{first} and {second}")
                    } else {
                        format!("drives {:?} and {:?}", od.id, d.id)
                    };
                    return Err(ConfigError::Invalid(format!(
                        "{both} are the same image file {}: the guest would write it through \
                         two devices and corrupt it (make both read-only with ro / is_read_only)",
                        od.path.display()
                    )));
                }
                seen.push((key, vm, d));
            }
        }
        Ok(())
    }

    /// Sum of the VMs' memory.
    pub fn total_mem_bytes(&self) -> u64 {
        self.vms.iter().map(|v| v.mem_bytes).sum()
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

/// The warning for a Firecracker `cpu_template` other than `"None"`: it is
/// accepted, so that Firecracker clients and configs work, and ignored.
pub fn cpu_template_warning(t: Option<&serde_json::Value>) -> Option<String> {
    match t {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s == "None" => None,
        Some(t) => Some(format!(
            "machine-config.cpu_template {t} is ignored: the guest sees the CPUID KVM supports"
        )),
    }
}

/// Firecracker's `machine-config` section. `smt` and `track_dirty_pages`
/// are accepted when false, `cpu_template` is accepted and ignored (with a
/// warning), and `huge_pages` is `"None"` or `"2M"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (Firecracker: 1..=32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Must be false: SMT topology is not exposed (vCPUs are separate cores).
    #[serde(default)]
    pub smt: bool,
    /// Accepted and ignored; foliovm uses KVM's supported CPUID.
    #[serde(default)]
    pub cpu_template: Option<serde_json::Value>,
    /// Must be false: dirty tracking is not implemented.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Accepted: `None` or `2M` (foliovm always prefers 2 MiB folios).
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// foliovm's own optional section. In a single-VM file it holds both the
/// VM's and the memory settings; in a `vms` file the top-level one holds the
/// memory settings and each VM's holds its own.
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
    /// Create the swap file here (it must not exist; it is unlinked at once).
    #[serde(default)]
    pub swap_file: Option<PathBuf>,
    /// Or create an anonymous swap file in this directory.
    #[serde(default)]
    pub swap_dir: Option<PathBuf>,
    /// Swap file size, e.g. `"2G"`.
    #[serde(default)]
    pub swap_size: Option<String>,
    /// This VM's resident memory never goes below this under reclaim.
    #[serde(default)]
    pub mem_min: Option<String>,
    /// This VM's resident memory is reclaimed down to this.
    #[serde(default)]
    pub mem_max: Option<String>,
    /// Lower priorities are reclaimed first.
    #[serde(default)]
    pub priority: Option<i32>,
}

impl FoliovmSection {
    fn has_memory_settings(&self) -> bool {
        self.mem_backend.is_some()
            || self.mem_budget.is_some()
            || self.swap_file.is_some()
            || self.swap_dir.is_some()
            || self.swap_size.is_some()
    }

    fn has_vm_settings(&self) -> bool {
        self.workload.is_some()
            || self.mem_min.is_some()
            || self.mem_max.is_some()
            || self.priority.is_some()
    }

    fn limits(&self) -> Result<mem::VmLimits, ConfigError> {
        Ok(mem::VmLimits {
            min_bytes: self
                .mem_min
                .as_deref()
                .map(|m| parse_size_of("mem_min", m))
                .transpose()?
                .unwrap_or(0),
            max_bytes: self
                .mem_max
                .as_deref()
                .map(|m| parse_size_of("mem_max", m))
                .transpose()?,
            priority: self.priority.unwrap_or(0),
        })
    }
}

/// The swap settings from `--swap-file`/`--swap-dir` and `--swap-size`.
///
/// # Errors
/// [`ConfigError::Invalid`] for a size without a place, both places, or a
/// place without a size.
pub fn swap_config(
    file: Option<&std::path::Path>,
    dir: Option<&std::path::Path>,
    size: Option<&str>,
) -> Result<Option<mem::SwapConfig>, ConfigError> {
    let target = match (file, dir) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::Invalid(
                "give either a swap file or a swap directory, not both".into(),
            ))
        }
        (Some(f), None) => mem::SwapTarget::File(f.to_path_buf()),
        (None, Some(d)) => mem::SwapTarget::Dir(d.to_path_buf()),
        (None, None) if size.is_some() => {
            return Err(ConfigError::Invalid(
                "a swap size needs a swap file or a swap directory".into(),
            ))
        }
        (None, None) => return Ok(None),
    };
    let size = size.ok_or_else(|| ConfigError::Invalid("a swap file needs a swap size".into()))?;
    Ok(Some(mem::SwapConfig {
        target,
        size_bytes: parse_size_of("swap size", size)?,
    }))
}

/// One VM's sections: the whole single-VM file, or one entry of `vms`.
/// Unknown keys land in `ignored` and are checked by [`ConfigFile::parse`]
/// (serde cannot combine `flatten` with `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
pub struct VmSections {
    /// The VM's name (only in `vms` entries; default `vmN`).
    #[serde(default)]
    pub name: Option<String>,
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

/// A multi-VM file: `{"foliovm": {memory settings}, "vms": [VmSections...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiFile {
    #[serde(default)]
    foliovm: Option<FoliovmSection>,
    /// Each a [`VmSections`], parsed one by one so that an error names
    /// its VM.
    vms: Vec<serde_json::Value>,
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

/// Parsing of config files.
pub struct ConfigFile;

fn memory_settings(fv: &FoliovmSection) -> Result<MemoryConfig, ConfigError> {
    Ok(MemoryConfig {
        backend: fv.mem_backend.unwrap_or_default(),
        budget: fv
            .mem_budget
            .as_deref()
            .map(|b| parse_size_of("mem_budget", b))
            .transpose()?,
        swap: swap_config(
            fv.swap_file.as_deref(),
            fv.swap_dir.as_deref(),
            fv.swap_size.as_deref(),
        )?,
    })
}

impl VmSections {
    /// Turn the sections into a [`VmConfig`] named `default_name` unless named.
    fn into_vm(
        self,
        default_name: String,
        malformed: &dyn Fn(String) -> ConfigError,
        warnings: &mut Vec<String>,
    ) -> Result<VmConfig, ConfigError> {
        for key in self.ignored.keys() {
            if FIRECRACKER_SECTIONS.contains(&key.as_str()) {
                warnings.push(format!(
                    "config section {key:?} is not supported yet and is ignored"
                ));
            } else {
                return Err(malformed(format!("unknown key {key:?}")));
            }
        }
        let mc = &self.machine_config;
        // As `PUT /machine-config` answers them.
        if mc.smt {
            return Err(malformed(
                "machine-config.smt is not supported (each vCPU is a core of its own)".into(),
            ));
        }
        if mc.track_dirty_pages {
            return Err(malformed(
                "machine-config.track_dirty_pages is not supported".into(),
            ));
        }
        if let Some(w) = cpu_template_warning(mc.cpu_template.as_ref()) {
            warnings.push(w);
        }
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
        let virtio = crate::virtio::from_sections(self.drives, self.balloon, warnings)?;
        let fv = self.foliovm.unwrap_or_default();
        let limits = fv.limits()?;
        let workload = fv.workload;
        let payload = match (self.boot_source, workload) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "config has both boot-source and foliovm.workload; choose one".into(),
                ))
            }
            (Some(bs), None) if bs.kernel_image_path.as_os_str().is_empty() => {
                // As `PUT /boot-source` answers it.
                return Err(malformed(
                    "boot-source.kernel_image_path must not be empty".into(),
                ));
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
        if matches!(payload, GuestPayload::Workload(_))
            && (!virtio.drives.is_empty() || virtio.balloon.is_some())
        {
            return Err(ConfigError::Invalid(
                "drives and balloon need a Linux guest (boot-source): the workload guest \
                 has no virtio drivers"
                    .into(),
            ));
        }
        Ok(VmConfig {
            name: self.name.unwrap_or(default_name),
            payload,
            mem_bytes,
            vcpus,
            limits,
            virtio,
        })
    }
}

/// The text of entry `i` of a multi-VM file's `vms` list, a slice of
/// `text`.
fn vm_entry_text(text: &str, i: usize) -> Option<&str> {
    #[derive(Deserialize)]
    struct Vms<'a> {
        #[serde(borrow)]
        vms: Vec<&'a serde_json::value::RawValue>,
    }
    let v: Vms = serde_json::from_str(text).ok()?;
    v.vms.get(i).map(|r| r.get())
}

/// Where in the VM object `obj` (a slice of `text`) reading failed: the
/// key path of the first section that does not deserialize (such as
/// `drives[0].is_read_only`) and " at line L column C" in `text`, or
/// `None` if none is found. A VM's sections are read from a parsed
/// `Value` (for the unknown key check and the VM names), whose errors have
/// neither; this reads each section again from its text, only once
/// reading has failed.
fn locate_section_error(text: &str, obj: &str) -> Option<(String, String)> {
    use serde_json::value::RawValue;
    type Located = (String, serde_json::Error);
    fn err<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<Located> {
        let mut de = serde_json::Deserializer::from_str(raw.get());
        serde_path_to_error::deserialize::<_, T>(&mut de)
            .err()
            .map(|e| (e.path().to_string(), e.into_inner()))
    }
    let map = serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(obj).ok()?;
    for (key, raw) in &map {
        let e = match key.as_str() {
            "name" => err::<String>(raw),
            "boot-source" => err::<BootSource>(raw),
            "machine-config" => err::<MachineConfig>(raw),
            "foliovm" => err::<FoliovmSection>(raw),
            "drives" => err::<Vec<crate::virtio::DriveSection>>(raw),
            "balloon" => err::<crate::virtio::BalloonSection>(raw),
            _ => None,
        };
        let Some((inner, e)) = e else { continue };
        // The path within the section: "." for the section itself,
        // "[0].x" within a list.
        let path = match inner.as_str() {
            "." => key.clone(),
            p if p.starts_with('[') => format!("{key}{p}"),
            p => format!("{key}.{p}"),
        };
        // Where the section starts in `text`: both are slices of it.
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        let before = &text[..start];
        let start_line = before.matches('\n').count() + 1;
        let start_col = start - before.rfind('\n').map_or(0, |n| n + 1);
        let (line, column) = match e.line() {
            1 => (start_line, start_col + e.column()),
            l => (start_line + l - 1, e.column()),
        };
        return Some((path, format!(" at line {line} column {column}")));
    }
    None
}

/// `error` (serde's, read from a value: no position) with the key path
/// and position [`locate_section_error`] finds for it in `obj`.
fn located(error: &serde_json::Error, text: &str, obj: Option<&str>) -> String {
    match obj.and_then(|obj| locate_section_error(text, obj)) {
        Some((path, at)) => format!("{path}: {error}{at}"),
        None => error.to_string(),
    }
}

/// Any JSON value, refused if an object in it has a key twice.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!("key {key:?} given twice")));
            }
            map.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(self)
    }
}

impl ConfigFile {
    /// Parse a config file's text. `path` only labels errors. Returns the
    /// configuration and warnings about ignored sections.
    ///
    /// # Errors
    /// [`ConfigError::Malformed`] for bad JSON, wrong types or unknown keys;
    /// [`ConfigError::Invalid`] for a missing payload or out-of-range numbers.
    pub fn parse(
        text: &str,
        path: &std::path::Path,
    ) -> Result<(RunConfig, Vec<String>), ConfigError> {
        let malformed = |message: String| ConfigError::Malformed {
            path: path.to_path_buf(),
            message,
        };
        // A key given twice would silently keep its last value.
        serde_json::from_str::<NoDuplicateKeys>(text).map_err(|e| malformed(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        let mut warnings = Vec::new();
        if value.get("vms").is_some() {
            // Its top-level foliovm section is located as a VM's sections
            // are; `vms` itself is only checked to be a list here.
            let file: MultiFile = serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let e = e.into_inner();
                malformed(match path.starts_with("foliovm") {
                    true => located(&e, text, Some(text)),
                    false => format!("{path}: {e}"),
                })
            })?;
            let top = file.foliovm.unwrap_or_default();
            if top.has_vm_settings() {
                return Err(malformed(
                    "workload, mem_min, mem_max and priority belong in each VM's foliovm section"
                        .into(),
                ));
            }
            let memory = memory_settings(&top)?;
            let mut vms = Vec::with_capacity(file.vms.len());
            for (i, entry) in file.vms.into_iter().enumerate() {
                // Which VM an error is about: by its name (or the default
                // one), or by its place when the name is not a string.
                let label = match (entry.is_object(), entry.get("name")) {
                    (true, None) => format!("VM \"vm{i}\""),
                    (true, Some(serde_json::Value::String(n))) => format!("VM {n:?}"),
                    _ => format!("vms[{i}]"),
                };
                let malformed = |m: String| malformed(format!("{label}: {m}"));
                let sections: VmSections = serde_json::from_value(entry)
                    .map_err(|e| malformed(located(&e, text, vm_entry_text(text, i))))?;
                if sections
                    .foliovm
                    .as_ref()
                    .is_some_and(FoliovmSection::has_memory_settings)
                {
                    return Err(malformed(
                        "mem_backend, mem_budget and swap settings belong in the top-level foliovm section".into(),
                    ));
                }
                let vm = sections
                    .into_vm(format!("vm{i}"), &malformed, &mut warnings)
                    .map_err(|e| match e {
                        ConfigError::Invalid(m) => ConfigError::Invalid(format!("{label}: {m}")),
                        other => other,
                    })?;
                vms.push(vm);
            }
            return Ok((RunConfig { vms, memory }, warnings));
        }
        let sections: VmSections =
            serde_json::from_value(value).map_err(|e| malformed(located(&e, text, Some(text))))?;
        if sections.name.is_some() {
            return Err(malformed(
                "unknown key \"name\" (names are for entries of \"vms\")".into(),
            ));
        }
        let memory = memory_settings(
            sections
                .foliovm
                .as_ref()
                .unwrap_or(&FoliovmSection::default()),
        )?;
        let vm = sections.into_vm("vm0".into(), &malformed, &mut warnings)?;
        Ok((RunConfig::single(vm, memory), warnings))
    }

    /// Read and parse a config file.
    ///
    /// # Errors
    /// As [`ConfigFile::parse`], plus [`ConfigError::Read`].
    pub fn load(path: &std::path::Path) -> Result<(RunConfig, Vec<String>), ConfigError> {
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
        for bad in ["", "M", "12Q", "-1G", "1.5G"] {
            assert!(
                matches!(parse_size(bad), Err(ConfigError::BadSize(_))),
                "{bad}"
            );
        }
        // Well formed, but too large, and said so.
        for big in ["99999999999999999999G", "18446744073709551615T"] {
            assert_eq!(
                parse_size(big).unwrap_err().to_string(),
                format!("size {big:?} is too large")
            );
        }
        assert_eq!(
            parse_size_of("mem_budget", "abc").unwrap_err().to_string(),
            "mem_budget: invalid size \"abc\": expected a number with an optional K, M, G \
             or T suffix (plain numbers are MiB)"
        );
    }

    fn cfg(mem: u64, vcpus: u8) -> VmConfig {
        VmConfig {
            name: "vm0".into(),
            payload: GuestPayload::Workload("seq:1M".into()),
            mem_bytes: mem,
            vcpus,
            limits: mem::VmLimits::default(),
            virtio: Default::default(),
        }
    }

    /// One image file behind two drives, either of them writable, is
    /// refused: two virtio-blk devices over one file, each with its own
    /// guest-side cache and filesystem, corrupt it. In one VM or two (a
    /// run's VMs share the process), by path, hard link or symlink.
    #[test]
    fn one_image_file_behind_two_writable_drives_is_refused() {
        let dir = std::env::temp_dir().join(format!("foliovm-cfg-twice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let link = dir.join("link.img");
        std::fs::hard_link(&img, &link).unwrap();
        let other = dir.join("other.img");
        std::fs::write(&other, [0u8; 4096]).unwrap();
        let drive = |id: &str, path: &Path, read_only: bool| crate::virtio::DriveConfig {
            id: id.into(),
            path: path.to_path_buf(),
            read_only,
            root: false,
        };
        let vm = |name: &str, drives| VmConfig {
            name: name.into(),
            payload: GuestPayload::Linux {
                kernel: "vmlinux".into(),
                initrd: None,
                cmdline: None,
            },
            virtio: crate::virtio::VirtioConfig {
                drives,
                balloon: None,
            },
            ..cfg(64 << 20, 1)
        };
        let one = |drives| RunConfig::single(vm("vm0", drives), MemoryConfig::default());
        let e = one(vec![drive("a", &img, false), drive("b", &img, false)])
            .validate(&LIMITS)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "drives \"a\" and \"b\" are the same image file {}: the guest would write it \
                 through two devices and corrupt it (make both read-only with ro / is_read_only)",
                img.display()
            )
        );
        let e = one(vec![drive("a", &img, true), drive("b", &link, false)])
            .validate(&LIMITS)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("drives \"a\" and \"b\" are the same image file"),
            "{e}"
        );
        assert!(one(vec![drive("a", &img, true), drive("b", &link, true)])
            .validate(&LIMITS)
            .is_ok());
        assert!(
            one(vec![drive("a", &img, false), drive("b", &other, false)])
                .validate(&LIMITS)
                .is_ok()
        );
        // A missing image is left to the open, which names it.
        assert!(one(vec![
            drive("a", &dir.join("no"), false),
            drive("b", &dir.join("no"), false)
        ])
        .validate(&LIMITS)
        .is_ok());
        let two = RunConfig {
            vms: vec![
                vm("x", vec![drive("a", &img, false)]),
                vm("y", vec![drive("a", &link, true)]),
            ],
            memory: MemoryConfig::default(),
        };
        let e = two.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("VM \"x\" drive \"a\" and VM \"y\" drive \"a\" are the same image file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
        // Sizes are named as given, not rounded to MiB.
        let mut c = cfg(64 << 20, 1);
        c.limits.max_bytes = Some(1024);
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("mem_max 1 KiB must be at least 2 MiB"), "{e}");
        c.limits = mem::VmLimits {
            min_bytes: (64 << 20) + 4096,
            ..Default::default()
        };
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.contains("mem_min 65540 KiB exceeds the VM's 64 MiB"),
            "{e}"
        );
    }

    #[test]
    fn budget_rules() {
        let mut m = MemoryConfig {
            backend: MemBackendKind::Anon,
            budget: Some(256 << 20),
            swap: None,
        };
        let e = m.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("needs the folio memory backend"), "{e}");
        m.backend = MemBackendKind::Folio;
        assert!(m.validate(&LIMITS).is_ok());
        for bad in [4096, 3 << 20, (64 << 20) + 4096] {
            m.budget = Some(bad);
            let e = m.validate(&LIMITS).unwrap_err().to_string();
            assert!(e.contains("a whole number of 2 MiB blocks"), "{e}");
        }
        m.budget = Some(3 << 20);
        let e = m.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("budget 3 MiB"), "{e}");
        m.budget = Some(64 << 30);
        assert!(m
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
            c.memory,
            MemoryConfig {
                backend: MemBackendKind::Folio,
                budget: Some(32 << 20),
                swap: None,
            }
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
    fn reclaim_limits_need_the_folio_backend() {
        let anon = MemoryConfig {
            backend: MemBackendKind::Anon,
            budget: None,
            swap: None,
        };
        let mut run = RunConfig::single(cfg(64 << 20, 1), anon);
        assert!(run.validate(&LIMITS).is_ok());
        for limits in [
            mem::VmLimits {
                min_bytes: 4 << 20,
                ..Default::default()
            },
            mem::VmLimits {
                max_bytes: Some(32 << 20),
                ..Default::default()
            },
            mem::VmLimits {
                priority: 1,
                ..Default::default()
            },
        ] {
            run.vms[0].limits = limits;
            let e = run.validate(&LIMITS).unwrap_err().to_string();
            assert!(
                e.contains("need the folio memory backend"),
                "{limits:?}: {e}"
            );
        }
        run.memory.backend = MemBackendKind::Folio;
        assert!(run.validate(&LIMITS).is_ok());
    }

    /// Minimums that add up to more than the budget are refused: reclaim
    /// never goes below them, so every VM would stall on its first fault
    /// past its minimum.
    #[test]
    fn minimums_must_fit_in_the_budget() {
        let folio = MemoryConfig {
            backend: MemBackendKind::Folio,
            budget: Some(16 << 20),
            swap: None,
        };
        let mut run = RunConfig::single(cfg(64 << 20, 1), folio);
        let mut b = cfg(64 << 20, 1);
        b.name = "b".into();
        run.vms.push(b);
        let min = |m: u64| mem::VmLimits {
            min_bytes: m << 20,
            ..Default::default()
        };
        (run.vms[0].limits, run.vms[1].limits) = (min(8), min(8));
        assert!(run.validate(&LIMITS).is_ok());
        run.vms[1].limits = min(12);
        let e = run.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.contains("mem_min add up to 20 MiB, more than the memory budget of 16 MiB"),
            "{e}"
        );
    }

    #[test]
    fn several_vms_share_memory_settings() {
        let text = r#"{
          "foliovm": {"mem_budget": "384M"},
          "vms": [
            {"name": "a", "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
             "foliovm": {"workload": "seq:256M"}},
            {"machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
             "foliovm": {"workload": "zipf:256M"}}
          ]
        }"#;
        let (c, w) = ConfigFile::parse(text, Path::new("m.json")).unwrap();
        assert!(w.is_empty());
        assert_eq!(c.vms.len(), 2);
        assert_eq!(
            (c.vms[0].name.as_str(), c.vms[1].name.as_str()),
            ("a", "vm1")
        );
        assert_eq!(c.memory.budget, Some(384 << 20));
        assert_eq!(c.total_mem_bytes(), 1 << 30);
        assert!(c.validate(&LIMITS).is_ok());

        let mut dup = c.clone();
        dup.vms[1].name = "a".into();
        assert!(dup
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("two VMs are named \"a\""));
        let mut bad = c.clone();
        bad.vms[1].vcpus = 0;
        let e = bad.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.contains("VM \"vm1\": vCPU count must be at least 1"),
            "{e}"
        );
        // A workload larger than its VM, named by the VM it is in.
        let mut big = c.clone();
        big.vms[1].mem_bytes = 128 << 20;
        let e = big.validate(&LIMITS).unwrap_err().to_string();
        assert!(
            e.starts_with("VM \"vm1\": workload range of 256 MiB needs at least"),
            "{e}"
        );

        for (text, want) in [
            (r#"{"vms": []}"#, "no VMs"),
            (
                r#"{"vms": [{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
                    "foliovm": {"workload": "seq:1M", "mem_budget": "1G"}}]}"#,
                "belong in the top-level",
            ),
            (r#"{"vms": [], "extra": 1}"#, "unknown field `extra`"),
            (
                r#"{"name": "x", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#,
                "names are for entries",
            ),
        ] {
            let r =
                ConfigFile::parse(text, Path::new("m.json")).and_then(|(c, _)| c.validate(&LIMITS));
            let e = r.unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn swap_and_limits() {
        let text = r#"{
          "foliovm": {"mem_budget": "384M", "swap_dir": "/var/tmp", "swap_size": "2G"},
          "vms": [
            {"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
             "foliovm": {"workload": "seq:256M", "mem_min": "64M", "priority": 5}},
            {"machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
             "foliovm": {"workload": "zipf:256M", "mem_max": "128M"}}
          ]
        }"#;
        let (c, _) = ConfigFile::parse(text, Path::new("m.json")).unwrap();
        assert_eq!(
            c.memory.swap,
            Some(mem::SwapConfig {
                target: mem::SwapTarget::Dir("/var/tmp".into()),
                size_bytes: 2 << 30
            })
        );
        assert_eq!(
            (c.vms[0].limits.min_bytes, c.vms[0].limits.priority),
            (64 << 20, 5)
        );
        assert_eq!(c.vms[1].limits.max_bytes, Some(128 << 20));
        assert!(c.validate(&LIMITS).is_ok());

        let mut bad = c.clone();
        bad.vms[0].limits.min_bytes = 1 << 30;
        assert!(bad
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("mem_min 1024 MiB exceeds"));
        let mut anon = c.clone();
        anon.memory.backend = MemBackendKind::Anon;
        anon.memory.budget = None;
        assert!(anon
            .validate(&LIMITS)
            .unwrap_err()
            .to_string()
            .contains("swap file needs the folio"));

        for (f, d, s, want) in [
            (Some("/a"), Some("/b"), Some("1G"), "not both"),
            (None, None, Some("1G"), "needs a swap file"),
            (Some("/a"), None, None, "needs a swap size"),
            (None, Some("/b"), Some("lots"), "invalid size"),
        ] {
            let e = swap_config(f.map(Path::new), d.map(Path::new), s)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(swap_config(None, None, None).unwrap(), None);
        let e = ConfigFile::parse(
            r#"{"foliovm": {"workload": "seq:1M"}, "vms": [{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}]}"#,
            Path::new("m.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("belong in each VM"), "{e}");
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
        let (run, warnings) = ConfigFile::parse(text, Path::new("vm.json")).unwrap();
        assert_eq!(run.memory, MemoryConfig::default());
        let c = &run.vms[0];
        assert_eq!(c.name, "vm0");
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
                "unknown key",
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
            (
                r#"{"boot-source": {"kernel_image_path": ""}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
                "boot-source.kernel_image_path must not be empty",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": true}, "foliovm": {"workload": "seq:1M"}}"#,
                "smt is not supported",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}, "foliovm": {"workload": "seq:1M"}}"#,
                "track_dirty_pages is not supported",
            ),
        ];
        for (text, want) in cases {
            let e = ConfigFile::parse(text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    /// A value of the wrong type says where it is, by its key path and
    /// its line, as a syntax error does: before, "invalid type: string
    /// \"64M\", expected u64" named neither the field nor the line (the
    /// sections are read from a parsed value, which has no positions).
    #[test]
    fn wrong_types_say_where_they_are() {
        let single = "{\n  \"machine-config\": {\"vcpu_count\": 1,\n    \"mem_size_mib\": \"64M\"},\n  \"foliovm\": {\"workload\": \"seq:1M\"}\n}";
        let e = ConfigFile::parse(single, Path::new("t.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "machine-config.mem_size_mib: invalid type: string \"64M\", expected u64 at line 3 column 25"
            ),
            "{e}"
        );
        let multi = "{\"vms\": [\n {\"name\": \"a\", \"machine-config\": {\"vcpu_count\": 1, \"mem_size_mib\": 64}, \"foliovm\": {\"workload\": \"seq:1M\"}},\n {\"name\": \"b\", \"machine-config\": {\"vcpu_count\": 1, \"mem_size_mib\": 64}, \"foliovm\": {\"workload\": \"seq:1M\", \"priority\": \"high\"}}\n]}";
        let e = ConfigFile::parse(multi, Path::new("t.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "VM \"b\": foliovm.priority: invalid type: string \"high\", expected i32 at line 3 column 124"
            ),
            "{e}"
        );
    }

    /// In a `vms` list an error names the VM it is about: serde's own
    /// (parsed from a value, it has no line and column), and a bad value
    /// found while reading the VM's sections.
    #[test]
    fn errors_in_a_vms_list_name_the_vm() {
        let good = r#"{"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#;
        for (second, want) in [
            (
                r#"{"name": "b", "machine-config": {"vcpu_count": "1", "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#,
                r#"VM "b": machine-config.vcpu_count: invalid type: string "1", expected u32"#,
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1}, "foliovm": {"workload": "seq:1M"}}"#,
                r#"VM "vm1": machine-config: missing field `mem_size_mib`"#,
            ),
            (
                r#"{"name": "b", "cpus": 2, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#,
                r#"VM "b": unknown key "cpus""#,
            ),
            (
                r#"{"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M", "mem_min": "x"}}"#,
                r#"VM "b": mem_min: invalid size "x""#,
            ),
            (
                r#"{"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 18446744073709551615}, "foliovm": {"workload": "seq:1M"}}"#,
                r#"VM "b": mem_size_mib 18446744073709551615 is too large"#,
            ),
            (
                r#"{"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
                r#"VM "b": config needs a boot-source section"#,
            ),
            (
                r#"{"name": 7, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M"}}"#,
                "vms[1]: name: invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"name": "b", "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "foliovm": {"workload": "seq:1M", "swap_size": "1G"}}"#,
                r#"VM "b": mem_backend, mem_budget and swap settings belong in the top-level"#,
            ),
        ] {
            let text = format!(r#"{{"vms": [{good}, {second}]}}"#);
            let e = ConfigFile::parse(&text, Path::new("m.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{second}: {e}");
        }
        // Not a VM object, not a list of VMs, and the shared section: by
        // their key paths.
        for (text, want) in [
            (
                format!(r#"{{"vms": [{good}, 7]}}"#),
                "vms[1]: invalid type: integer `7`, expected struct VmSections".to_string(),
            ),
            (
                r#"{"vms": "a, b"}"#.to_string(),
                r#"vms: invalid type: string "a, b", expected a sequence"#.to_string(),
            ),
            (
                format!(r#"{{"foliovm": {{"mem_budget": 384}}, "vms": [{good}]}}"#),
                "foliovm.mem_budget: invalid type: integer `384`, expected a string at line 1 column 30"
                    .to_string(),
            ),
        ] {
            let e = ConfigFile::parse(&text, Path::new("m.json"))
                .unwrap_err()
                .to_string();
            assert!(e.ends_with(&want), "{text}: {e}");
        }
    }

    #[test]
    fn a_cpu_template_is_accepted_with_a_warning() {
        let with = |t: &str| {
            let text = format!(
                r#"{{"machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": {t}}}, "foliovm": {{"workload": "seq:1M"}}}}"#
            );
            ConfigFile::parse(&text, Path::new("t.json")).unwrap().1
        };
        let w = with(r#""T2""#);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("cpu_template \"T2\" is ignored"), "{w:?}");
        assert!(with(r#""None""#).is_empty());
        assert!(with("null").is_empty());
    }

    #[test]
    fn host_memory_is_readable() {
        assert!(host_mem_bytes().unwrap() > 64 << 20);
    }

    // ---- Seeded hostile input ----------------------------------------------

    use devices::testing::{for_each_seed, Rng};
    use serde_json::json;

    const CONFIG_SEEDS: [u64; 4] = [1, 2, 3, 0x5eed_c0f1];

    /// Sizes: well-formed ones parse to their bytes; anything else is
    /// refused with an error quoting the string, never a panic or a wrap.
    #[test]
    fn sizes_parse_exactly_or_are_refused_naming_the_string() {
        for_each_seed("config sizes", &CONFIG_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            for _ in 0..2000 {
                let n = match rng.below(3) {
                    0 => rng.next_u64() % 10_000,
                    1 => rng.next_u64(),
                    _ => rng.next_u64() >> rng.below(64),
                };
                let (suffix, mult) = rng.pick(&[
                    ("", 1u64 << 20),
                    ("B", 1),
                    ("k", 1 << 10),
                    ("M", 1 << 20),
                    ("g", 1 << 30),
                    ("T", 1 << 40),
                ]);
                let s = format!("{}{n}{suffix}", rng.pick(&["", " "]));
                match n.checked_mul(mult) {
                    Some(b) => assert_eq!(parse_size(&s).unwrap(), b, "{s:?}"),
                    None => assert!(
                        matches!(parse_size(&s), Err(ConfigError::SizeTooLarge(_))),
                        "{s:?}"
                    ),
                }
                // One character changed, added or dropped.
                let mut b: Vec<char> = s.chars().collect();
                let at = rng.below(b.len() + 1);
                let c = rng.pick(&[
                    '-', '+', '.', 'x', 'Q', ' ', '\u{e9}', '0', 'M', '\u{663}', 'e',
                ]);
                match rng.below(3) {
                    0 if at < b.len() => b[at] = c,
                    1 => b.insert(at, c),
                    _ if at < b.len() => {
                        b.remove(at);
                    }
                    _ => {}
                }
                let t: String = b.into_iter().collect();
                match parse_size(&t) {
                    Ok(v) => assert!(v == parse_size(t.trim()).unwrap(), "{t:?}"),
                    Err(e) => assert!(e.to_string().contains(&format!("{t:?}")), "{t:?}: {e}"),
                }
            }
        });
    }

    /// A config file with one field made bad is refused with an error that
    /// names the field; unchanged, it parses to its values.
    #[test]
    fn config_files_with_one_bad_field_are_refused_naming_it() {
        for_each_seed("config files", &CONFIG_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            for case in 0..500 {
                let vcpus = 1 + rng.below(32) as u64;
                let mib = 64 + rng.below(4096) as u64;
                let mut vm = json!({
                    "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mib, "smt": false},
                    "foliovm": {"workload": "seq:1M", "mem_min": "8M", "mem_max": "32M", "priority": 1},
                });
                let multi = rng.one_in(2);
                let (section, field) = rng.pick(&[
                    ("machine-config", "vcpu_count"),
                    ("machine-config", "mem_size_mib"),
                    ("machine-config", "smt"),
                    ("machine-config", "huge_pages"),
                    ("foliovm", "mem_min"),
                    ("foliovm", "mem_max"),
                    ("foliovm", "priority"),
                ]);
                let bad = rng.pick(&[
                    json!(null),
                    json!("x"),
                    json!(-1),
                    json!(1.5),
                    json!(1e308),
                    json!(u64::MAX),
                    json!([1]),
                    json!({"a": {"b": [null]}}),
                    json!(true),
                    json!("18446744073709551616T"),
                    json!("-1M"),
                    json!(""),
                ]);
                let valid = rng.one_in(5);
                if !valid {
                    vm[section][field] = bad.clone();
                }
                let text = match multi {
                    true => json!({"vms": [vm]}).to_string(),
                    false => vm.to_string(),
                };
                let what = format!("case {case}: {text}");
                let r = ConfigFile::parse(&text, Path::new("f.json"))
                    .and_then(|(c, _)| c.validate(&LIMITS).map(|()| c));
                if valid {
                    let c = r.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(
                        (c.vms[0].vcpus as u64, c.vms[0].mem_bytes),
                        (vcpus, mib << 20),
                        "{what}"
                    );
                    assert_eq!(c.vms[0].limits.max_bytes, Some(32 << 20), "{what}");
                    continue;
                }
                let Err(e) = r else {
                    // null is "not given" for an optional field.
                    let optional =
                        ["huge_pages", "mem_min", "mem_max", "priority"].contains(&field);
                    // And a priority may be negative.
                    let ok =
                        (optional && bad.is_null()) || (field == "priority" && bad == json!(-1));
                    assert!(ok, "{what}: accepted");
                    continue;
                };
                let e = e.to_string();
                let shown = match field {
                    "vcpu_count" => ["vcpu_count", "vCPU count"],
                    "mem_size_mib" => ["mem_size_mib", "memory size"],
                    f => [f, f],
                };
                // serde's type errors give the line and column instead.
                let located = e.contains(" at line ");
                assert!(
                    shown.iter().any(|s| e.contains(s)) || located,
                    "{what}: {e:?} names no {field}"
                );
            }
        });
    }

    /// Every path to a value in `v` (object keys and array indices).
    fn json_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        let kids: Vec<(String, &serde_json::Value)> = match v {
            serde_json::Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
            serde_json::Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            _ => return,
        };
        for (k, kid) in kids {
            at.push(k);
            out.push(at.clone());
            json_paths(kid, at, out);
            at.pop();
        }
    }

    fn json_at<'a>(
        v: &'a mut serde_json::Value,
        path: &[String],
    ) -> Option<&'a mut serde_json::Value> {
        path.iter().try_fold(v, |v, k| match v {
            serde_json::Value::Object(m) => m.get_mut(k),
            serde_json::Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        })
    }

    /// Words a message uses for a config key whose check is shared with
    /// the flags and the API ("memory size must be greater than 0" for
    /// `mem_size_mib: 0`).
    fn key_words(key: &str) -> &'static [&'static str] {
        match key {
            "mem_size_mib" => &["memory size", "mem_size_mib"],
            "vcpu_count" => &["vCPU count", "vcpu_count"],
            "mem_budget" => &["memory budget", "mem_budget"],
            "swap_file" | "swap_dir" => &["swap file", "swap directory"],
            "swap_size" => &["swap size", "swap_size"],
            "workload" => &["workload"],
            "kernel_image_path" => &["kernel", "boot-source"],
            "amount_mib" => &["balloon"],
            "vms" => &["VM"],
            "path_on_host" | "drive_id" => &["drive"],
            _ => &[],
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Config files with random values replaced, removed or added are
        /// parsed and checked without a panic, and a refusal names a key
        /// on the changed path, the value put there, or its setting.
        #[test]
        fn mutated_config_files_are_refused_by_name_or_accepted(
            multi in proptest::bool::ANY,
            edits in proptest::collection::vec((proptest::num::usize::ANY, 0usize..20), 1..4),
        ) {
            let text = if multi {
                r#"{"foliovm": {"mem_budget": "384M", "swap_dir": "/var/tmp", "swap_size": "2G"},
                    "vms": [
                      {"name": "a", "machine-config": {"vcpu_count": 1, "mem_size_mib": 512},
                       "foliovm": {"workload": "seq:256M", "mem_min": "64M", "priority": 5}},
                      {"name": "b", "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
                       "boot-source": {"kernel_image_path": "/nonexistent/vmlinux", "boot_args": "console=ttyS0"},
                       "drives": [{"drive_id": "rootfs", "path_on_host": "/nonexistent.img", "is_root_device": true, "is_read_only": false}],
                       "balloon": {"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1},
                       "foliovm": {"mem_max": "128M"}}]}"#
            } else {
                r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux", "initrd_path": "/nonexistent.cpio"},
                    "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
                    "drives": [{"drive_id": "d", "path_on_host": "/nonexistent.img", "is_root_device": false, "is_read_only": true}],
                    "foliovm": {"mem_budget": "128M", "swap_file": "/tmp/s", "swap_size": "1G", "priority": -1}}"#
            };
            let hostile = [
                serde_json::json!(null), serde_json::json!(true), serde_json::json!(-1),
                serde_json::json!(0), serde_json::json!(1.5), serde_json::json!(1e30),
                serde_json::json!(u64::MAX), serde_json::json!(""), serde_json::json!("x"),
                serde_json::json!("-1M"), serde_json::json!("99999999999999999999G"),
                serde_json::json!([]), serde_json::json!({}), serde_json::json!("A".repeat(300)),
                serde_json::json!(4097), serde_json::json!(100000000),
            ];
            let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
            let mut changed: Vec<(Vec<String>, String)> = Vec::new();
            for (pick, action) in edits {
                let mut paths = Vec::new();
                json_paths(&v, &mut Vec::new(), &mut paths);
                // Every key may be gone already.
                if paths.is_empty() {
                    break;
                }
                let path = paths[pick % paths.len()].clone();
                let (last, parent) = path.split_last().unwrap();
                match action {
                    // Drop it.
                    16 | 17 => {
                        match json_at(&mut v, parent) {
                            Some(serde_json::Value::Object(m)) => { m.remove(last); }
                            Some(serde_json::Value::Array(a)) => { a.remove(last.parse().unwrap()); }
                            _ => {}
                        }
                        changed.push((path, String::new()));
                    }
                    // A key nobody knows beside it.
                    18 | 19 => {
                        if let Some(serde_json::Value::Object(m)) = json_at(&mut v, parent) {
                            m.insert("bogus_key".into(), serde_json::json!(1));
                        }
                        changed.push((parent.to_vec(), "bogus_key".into()));
                    }
                    i => {
                        let new = hostile[i].clone();
                        let shown = match &new { serde_json::Value::String(s) => s.clone(), o => o.to_string() };
                        *json_at(&mut v, &path).unwrap() = new;
                        changed.push((path, shown));
                    }
                }
            }
            let text = v.to_string();
            let r = ConfigFile::parse(&text, Path::new("m.json")).and_then(|(c, _)| c.validate(&LIMITS));
            if let Err(e) = r {
                let e = e.to_string();
                // serde names a field it misses.
                let named = e.contains("missing field `") || changed.iter().any(|(path, shown)| {
                    (shown.len() >= 2 && e.contains(shown.as_str()))
                        || path.iter().any(|k| {
                            k.parse::<usize>().is_err()
                                && (e.contains(k.as_str()) || key_words(k).iter().any(|w| e.contains(w)))
                        })
                });
                proptest::prop_assert!(named, "{changed:?}: {e}");
            }
        }
    }
}
