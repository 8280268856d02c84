//! Loading a Linux kernel (ELF vmlinux or bzImage) and initrd, and writing
//! the boot protocol's zero page with the e820 map and command line.

use super::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use mem::GuestAddress;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestMemoryMmap};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// setup_header.xloadflags: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading a kernel or initrd.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    KernelIo {
        /// Path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("{path} is not a Linux kernel image (neither ELF vmlinux nor bzImage)")]
    NotAKernel {
        /// Path given.
        path: PathBuf,
    },
    /// The ELF file is not a 64-bit x86 image.
    #[error("{path} is an ELF {what}, not a 64-bit x86 (x86-64) kernel")]
    ElfNotX86_64 {
        /// Path given.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("{path} is a bzImage without a 64-bit entry point (XLF_KERNEL_64)")]
    Not64Bit {
        /// Path given.
        path: PathBuf,
    },
    /// The image is shorter than its own headers say: cut short.
    #[error("kernel image {path} is cut short: it is {size} bytes, and its headers describe {described}")]
    Truncated {
        /// Path given.
        path: PathBuf,
        /// The file's size.
        size: u64,
        /// The size its headers describe (for an ELF, up to the end of
        /// the last thing they place in the file).
        described: u64,
    },
    /// linux-loader rejected the image (bad headers, does not fit in RAM).
    #[error("cannot load kernel image {path}: {reason}")]
    Load {
        /// Path given.
        path: PathBuf,
        /// linux-loader's description.
        reason: String,
    },
    /// The kernel does not fit in guest RAM.
    #[error("kernel image {path} needs guest RAM up to {needs_mib} MiB (it loads at {start:#x}..{end:#x}); the VM has {have_mib} MiB")]
    KernelTooLarge {
        /// Path given.
        path: PathBuf,
        /// Where the image loads, and where what it needs there ends.
        start: u64,
        /// End of that range.
        end: u64,
        /// `end` in MiB, rounded up.
        needs_mib: u64,
        /// The VM's RAM in MiB.
        have_mib: u64,
    },
    /// The image would leave the guest running what it did not load: an
    /// ELF without a loadable segment, or an entry point outside what the
    /// image loads (the guest would run whatever guest memory holds there).
    #[error("kernel image {path} {what}")]
    BadEntry {
        /// Path given.
        path: PathBuf,
        /// What is wrong, with the addresses.
        what: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    InitrdIo {
        /// Path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is empty or not a regular file: nothing a kernel could
    /// unpack, and the guest would only fail to mount its root.
    #[error("initrd {path} is {what}")]
    InitrdNotAnImage {
        /// Path given.
        path: PathBuf,
        /// "empty" or "not a regular file".
        what: &'static str,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory: {available} bytes free between the kernel and the top of low RAM")]
    InitrdTooLarge {
        /// Path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Space available.
        available: u64,
    },
    /// The command line is invalid or longer than the boot protocol allows.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// What.
        what: &'static str,
    },
}

/// Which format a kernel image is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF vmlinux.
    Elf,
    /// A bzImage.
    BzImage,
}

/// Where a loaded kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: GuestAddress,
    /// Its format.
    pub format: KernelFormat,
    /// The bzImage's setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Sniff the image format from its magic numbers.
///
/// # Errors
/// [`BootError::KernelIo`] if the file cannot be read, [`BootError::NotAKernel`]
/// if it has neither magic.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let io = |source| BootError::KernelIo {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let n = read_up_to(file, &mut head).map_err(io)?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        // e_ident[EI_CLASS] is 2 for 64-bit; e_machine (little-endian, at
        // 18) is 62 for x86-64. linux-loader's own refusal of a 32-bit
        // image names a header field instead.
        let refuse = |what| BootError::ElfNotX86_64 {
            path: path.to_path_buf(),
            what,
        };
        // (A header too short to tell is left to the loader's refusal.)
        if n >= 20 && head[4] != 2 {
            return Err(refuse("of 32 bits"));
        }
        if n >= 20 && head[18..20] != 62u16.to_le_bytes() {
            return Err(refuse("for another architecture"));
        }
        // e_type (at 16): a vmlinux is ET_EXEC. A program or library
        // (`/bin/ls`, `libc.so.6`) is ET_DYN, which linux-loader refuses
        // only as an "Invalid entry address" (linked near 0).
        if n >= 18 {
            match u16::from_le_bytes([head[16], head[17]]) {
                2 => {}
                1 => return Err(refuse("relocatable object file (a .o or .ko)")),
                3 => {
                    return Err(refuse(
                        "shared object (a library or a position-independent program)",
                    ))
                }
                4 => return Err(refuse("core dump")),
                _ => return Err(refuse("file of an unknown type (e_type)")),
            }
        }
        // e_entry (at 24): a kernel is entered at or above 1 MiB, where the
        // loader puts it; a static program's entry is often there too, so
        // this only catches what is linked lower.
        if n >= 32
            && u64::from_le_bytes(head[24..32].try_into().expect("8 bytes")) < HIMEM_START.raw()
        {
            return Err(refuse("program entered below 1 MiB, where no kernel loads"));
        }
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.to_path_buf(),
    })
}

/// Open `path` for reading if it is a regular file; anything else (a
/// FIFO, a terminal, a socket, a directory) is an `InvalidInput` error.
/// The path comes from an API client and the image is loaded on the event
/// loop thread: the open must not wait, as opening a FIFO does until a
/// writer comes, and the reads must not either. So it opens with
/// `O_NONBLOCK`, looks at what it opened, and then restores blocking
/// reads (a regular file's never wait for another process).
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: fcntl(2) on a descriptor `file` owns and keeps open; F_GETFL
    // and F_SETFL take and change only its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Load the kernel at `path` into guest memory.
///
/// # Errors
/// See [`BootError`].
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open_regular(path).map_err(|source| BootError::KernelIo {
        path: path.to_path_buf(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let size = file
        .metadata()
        .map_err(|source| BootError::KernelIo {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // Before the loader, which would load a bzImage cut short and let the
    // guest run into what is missing, and names neither the cause.
    if let Some(described) = described_len(&mut file, format).filter(|&d| d > size) {
        return Err(BootError::Truncated {
            path: path.to_path_buf(),
            size,
            described,
        });
    }
    let himem = vm_memory::GuestAddress(HIMEM_START.raw());
    // Checked before the loader, whose own failure here only says it
    // could not read the image; a bzImage also needs room to decompress.
    let extent = image_extent(&mut file, format);
    if let Some((start, end)) = extent {
        let fits = end > start
            && vm_memory::GuestMemoryBackend::check_range(
                mem,
                vm_memory::GuestAddress(start),
                (end - start) as usize,
            );
        if !fits {
            return Err(BootError::KernelTooLarge {
                path: path.to_path_buf(),
                start,
                end,
                needs_mib: end.div_ceil(1 << 20),
                have_mib: vm_memory::GuestMemoryBackend::iter(mem)
                    .map(vm_memory::GuestMemoryRegion::len)
                    .sum::<u64>()
                    >> 20,
            });
        }
    }
    let bad_entry = |what: String| BootError::BadEntry {
        path: path.to_path_buf(),
        what,
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(himem)).map_err(load_err)?;
            // linux-loader loads an ELF without a PT_LOAD segment (nothing)
            // and takes any e_entry; the guest would run zeros, or another
            // segment's middle, and fault with no word of why.
            let entry = r.kernel_load.0;
            let (start, end) = extent
                .ok_or_else(|| bad_entry("is an ELF with no loadable (PT_LOAD) segment".into()))?;
            if !(start..end).contains(&entry) {
                return Err(bad_entry(format!(
                    "is entered at {entry:#x}, outside what it loads ({start:#x}..{end:#x})"
                )));
            }
            Ok(LoadedKernel {
                entry: GuestAddress(entry),
                // linux-loader's end leaves out segments with no bytes in
                // the file (memory to be zeroed only); the initrd goes
                // above those too.
                end: GuestAddress(r.kernel_end.max(end)),
                format,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(himem)).map_err(load_err)?;
            let hdr = r.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_path_buf(),
            })?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit {
                    path: path.to_path_buf(),
                });
            }
            // A bzImage whose headers describe no code past its setup
            // sectors (`syssize` 0, nothing after them) loads nothing, and
            // its entry lies past what it loaded.
            let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            if entry >= r.kernel_end {
                return Err(bad_entry(format!(
                    "has no 64-bit kernel code after its setup sectors: it loads {:#x}..{:#x} and is entered at {entry:#x}",
                    r.kernel_load.0, r.kernel_end
                )));
            }
            Ok(LoadedKernel {
                entry: GuestAddress(entry),
                end: GuestAddress(r.kernel_end),
                format,
                setup_header: Some(hdr),
            })
        }
    }
}

/// How long the image's headers say it is: a bzImage's setup sectors and
/// `syssize` (its protected-mode code, in 16-byte units; the build tool
/// writes exactly that much), an ELF's header, program headers and the end
/// of its furthest `PT_LOAD` segment in the file. `None` if the headers
/// cannot be read at all (a read error); a header cut short describes at
/// least the header.
fn described_len(file: &mut File, format: KernelFormat) -> Option<u64> {
    let mut head = [0u8; 0x1f8];
    file.seek(SeekFrom::Start(0)).ok()?;
    let n = read_up_to(file, &mut head).ok()?;
    match format {
        KernelFormat::BzImage => {
            // Sniffed by the magic at 0x202, so the fields below were read.
            let setup_sects = match head[0x1f1] {
                0 => 4,
                k => u64::from(k),
            };
            let syssize = u64::from(u32::from_le_bytes(head[0x1f4..0x1f8].try_into().ok()?));
            Some((setup_sects + 1) * 512 + syssize * 16)
        }
        KernelFormat::Elf => {
            const EHDR: usize = 64;
            if n < EHDR {
                return Some(EHDR as u64);
            }
            let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().ok()?);
            let phentsize = u64::from(u16::from_le_bytes([head[0x36], head[0x37]]));
            let phnum = u64::from(u16::from_le_bytes([head[0x38], head[0x39]]));
            let phdrs_end = phoff.checked_add(phnum.checked_mul(phentsize)?)?;
            let mut end = phdrs_end.max(EHDR as u64);
            if phentsize < 0x38 {
                return Some(end);
            }
            let len = file.metadata().ok()?.len();
            if phdrs_end > len {
                return Some(end);
            }
            for i in 0..phnum {
                let mut ph = [0u8; 0x38];
                file.seek(SeekFrom::Start(phoff + i * phentsize)).ok()?;
                file.read_exact(&mut ph).ok()?;
                if u32::from_le_bytes(ph[0..4].try_into().ok()?) != 1 {
                    continue; // not PT_LOAD
                }
                let offset = u64::from_le_bytes(ph[0x08..0x10].try_into().ok()?);
                let filesz = u64::from_le_bytes(ph[0x20..0x28].try_into().ok()?);
                end = end.max(offset.checked_add(filesz)?);
            }
            Some(end)
        }
    }
}

/// The guest-physical range a kernel image needs: an ELF's `PT_LOAD`
/// segments (their memory size, `.bss` included), or a bzImage's
/// protected-mode code from `code32_start` with its `init_size` (the room
/// it decompresses in). `None` if the headers cannot be read; the loader
/// then reports what is wrong.
fn image_extent(file: &mut File, format: KernelFormat) -> Option<(u64, u64)> {
    let mut at = |off: u64, buf: &mut [u8]| -> Option<()> {
        file.seek(SeekFrom::Start(off)).ok()?;
        file.read_exact(buf).ok()
    };
    match format {
        KernelFormat::Elf => {
            let mut eh = [0u8; 64];
            at(0, &mut eh)?;
            let phoff = u64::from_le_bytes(eh[0x20..0x28].try_into().ok()?);
            let phentsize = u64::from(u16::from_le_bytes([eh[0x36], eh[0x37]]));
            let phnum = u64::from(u16::from_le_bytes([eh[0x38], eh[0x39]]));
            if phentsize < 0x38 {
                return None;
            }
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            for i in 0..phnum {
                let mut ph = [0u8; 0x38];
                at(phoff.checked_add(i * phentsize)?, &mut ph)?;
                if u32::from_le_bytes(ph[0..4].try_into().ok()?) != 1 {
                    continue; // not PT_LOAD
                }
                let paddr = u64::from_le_bytes(ph[0x18..0x20].try_into().ok()?);
                let memsz = u64::from_le_bytes(ph[0x28..0x30].try_into().ok()?);
                lo = lo.min(paddr);
                hi = hi.max(paddr.checked_add(memsz)?);
            }
            (lo < hi).then_some((lo, hi))
        }
        KernelFormat::BzImage => {
            let mut hdr = [0u8; 0x268];
            at(0, &mut hdr)?;
            let setup_sects = match hdr[0x1f1] {
                0 => 4,
                n => u64::from(n),
            };
            let code32 = u64::from(u32::from_le_bytes(hdr[0x214..0x218].try_into().ok()?));
            let init_size = u64::from(u32::from_le_bytes(hdr[0x260..0x264].try_into().ok()?));
            let payload = file
                .metadata()
                .ok()?
                .len()
                .checked_sub((setup_sects + 1) * 512)?;
            Some((code32, code32 + payload.max(init_size)))
        }
    }
}

/// Where to put an initrd of `size` bytes: the highest page-aligned address
/// whose end is at or below the top of low RAM, and above the kernel.
///
/// # Errors
/// `Err(available)` with the free space if it does not fit.
pub fn initrd_placement(
    mem_bytes: u64,
    kernel_end: GuestAddress,
    size: u64,
) -> Result<GuestAddress, u64> {
    let top = layout::low_ram_end(mem_bytes).raw();
    let floor = kernel_end
        .raw()
        .max(HIMEM_START.raw())
        .next_multiple_of(4096);
    let available = top.saturating_sub(floor);
    match top.checked_sub(size) {
        Some(start) => {
            let start = start & !0xfff;
            if start >= floor {
                Ok(GuestAddress(start))
            } else {
                Err(available)
            }
        }
        None => Err(available),
    }
}

/// Load the initrd at `path` as high as possible in low RAM.
/// Returns its guest address and size.
///
/// # Errors
/// [`BootError::InitrdIo`], [`BootError::InitrdNotAnImage`] or
/// [`BootError::InitrdTooLarge`].
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: GuestAddress,
    path: &Path,
) -> Result<(GuestAddress, u64), BootError> {
    let io = |source| BootError::InitrdIo {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |what| BootError::InitrdNotAnImage {
        path: path.to_path_buf(),
        what,
    };
    let mut file = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(refuse("not a regular file"))
        }
        Err(e) => return Err(io(e)),
    };
    let size = file.metadata().map_err(io)?.len();
    if size == 0 {
        return Err(refuse("empty"));
    }
    let addr = initrd_placement(mem_bytes, kernel_end, size).map_err(|available| {
        BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            available,
        }
    })?;
    let mut buf = Vec::with_capacity(size as usize);
    file.read_to_end(&mut buf).map_err(io)?;
    mem.write_slice(&buf, vm_memory::GuestAddress(addr.raw()))
        .map_err(|_| BootError::GuestWrite { what: "initrd" })?;
    Ok((addr, size))
}

/// Build the command line from `base` plus `extra` options, which go before
/// any ` -- ` (everything after it is init's argv).
///
/// # Errors
/// [`BootError::Cmdline`] if it is too long or has invalid characters.
pub fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let (kernel_part, init_part) = match base.find(" -- ") {
        Some(i) => (&base[..i], Some(&base[i + 4..])),
        None if base.starts_with("-- ") => ("", Some(&base[3..])),
        None => (base, None),
    };
    // linux-loader refuses these too, without saying which or where.
    if let Some((i, ch)) = base
        .char_indices()
        .find(|&(_, ch)| !(' '..='~').contains(&ch))
    {
        return Err(BootError::Cmdline(format!(
            "character {ch:?} at byte {i} is not printable ASCII \
             (only ' ' to '~' are taken; separate words with spaces)"
        )));
    }
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let added: usize = extra.iter().map(|e| e.trim().len() + 1).sum();
    let mut push = |s: &str| -> Result<(), BootError> {
        if s.trim().is_empty() {
            return Ok(());
        }
        c.insert_str(s.trim()).map_err(|e| match e {
            linux_loader::cmdline::Error::TooLarge => BootError::Cmdline(format!(
                "longer than the {} bytes the kernel takes (with a terminating NUL), \
                 counting the {added} bytes foliovm adds for its devices",
                CMDLINE_MAX_SIZE
            )),
            e => BootError::Cmdline(e.to_string()),
        })
    };
    push(kernel_part)?;
    for e in extra {
        push(e)?;
    }
    if let Some(init) = init_part {
        push("--")?;
        push(init)?;
    }
    Ok(c)
}

/// Write the command line and the zero page (setup header, e820 map,
/// command line pointer, initrd).
///
/// # Errors
/// [`BootError::GuestWrite`] if guest RAM does not cover them.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    mem_bytes: u64,
) -> Result<(), BootError> {
    load_cmdline(mem, vm_memory::GuestAddress(CMDLINE_START.raw()), cmdline).map_err(|_| {
        BootError::GuestWrite {
            what: "kernel command line",
        }
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    let params = zero_page(kernel.setup_header, cmdline_len as u32, initrd, mem_bytes);
    mem.write_obj(params, vm_memory::GuestAddress(ZERO_PAGE_START.raw()))
        .map_err(|_| BootError::GuestWrite {
            what: "boot_params",
        })
}

/// The zero page contents; separated from I/O so it can be unit tested.
pub fn zero_page(
    bz_header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(GuestAddress, u64)>,
    mem_bytes: u64,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = bz_header {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        p.hdr.header = KERNEL_HDR_MAGIC;
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START.raw() as u32;
    p.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr.raw() as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = layout::e820_map(mem_bytes);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    p.e820_entries = map.len() as u8;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zero_page_for_elf_has_magic_e820_and_initrd() {
        let p = zero_page(
            None,
            42,
            Some((GuestAddress(0x800_0000), 0x1234)),
            256 << 20,
        );
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x800_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (0x10_0000, (256 << 20) - 0x10_0000, 1)
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let h = setup_header {
            xloadflags: 3,
            version: 0x20f,
            ..Default::default()
        };
        let p = zero_page(Some(h), 1, None, 64 << 20);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn initrd_goes_high_and_refuses_overlap() {
        let end = GuestAddress(0x300_0000);
        let a = initrd_placement(256 << 20, end, 10_000).unwrap();
        assert_eq!(a.raw() % 4096, 0);
        assert!(a.raw() + 10_000 <= 256 << 20);
        assert!(a.raw() >= (256 << 20) - 16384);
        // Exactly fits.
        assert!(initrd_placement(64 << 20, end, (64 << 20) - 0x300_0000).is_ok());
        // One byte too many.
        let e = initrd_placement(64 << 20, end, (64 << 20) - 0x300_0000 + 1).unwrap_err();
        assert_eq!(e, (64 << 20) - 0x300_0000);
        // Big guests: the initrd stays below the MMIO gap.
        let a = initrd_placement(8 << 30, end, 1 << 20).unwrap();
        assert!(a.raw() + (1 << 20) <= 0xd000_0000);
    }

    #[test]
    fn cmdline_extras_go_before_init_args() {
        let extra = vec!["noxsave".to_string(), "nopku".to_string()];
        let c = build_cmdline("console=ttyS0 -- echo hi", &extra).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 noxsave nopku -- echo hi"
        );
        let c = build_cmdline("console=ttyS0", &extra).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 noxsave nopku"
        );
        // The character linux-loader refuses is named, with its place.
        for (base, want) in [
            ("console=ttyS0\tquiet", "'\\t' at byte 13"),
            ("a\nb", "'\\n' at byte 1"),
            ("root=/dev/vdé", "'é' at byte 12"),
        ] {
            let e = build_cmdline(base, &extra).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "invalid kernel command line: character {want} is not printable ASCII \
                     (only ' ' to '~' are taken; separate words with spaces)"
                )
            );
        }
        let e = build_cmdline(&"x".repeat(2040), &extra)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("longer than the 2048 bytes the kernel takes (with a terminating NUL), counting the 14 bytes foliovm adds"),
            "{e}"
        );
    }

    #[test]
    fn a_kernel_larger_than_guest_ram_is_named_with_the_ram_it_needs() {
        let dir = std::env::temp_dir().join(format!("foliovm-boot-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bzImage");
        // A bzImage header: one setup sector, 64-bit entry, code at 1 MiB,
        // 12 KiB of payload that decompresses in 40 MiB.
        let mut img = vec![0u8; 2 * 512 + 12 * 1024];
        img[0x1f1] = 1;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&(40u32 << 20).to_le_bytes());
        std::fs::write(&p, &img).unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 32 << 20)]).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::KernelTooLarge {
                    start: 0x10_0000,
                    needs_mib: 41,
                    have_mib: 32,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("needs guest RAM up to 41 MiB"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn non_kernels_are_named() {
        let dir = std::env::temp_dir().join(format!("foliovm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-a-kernel");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&[0x55; 4096])
            .unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 32 << 20)]).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        // ELF headers of 32 bits, and for another machine (aarch64).
        let mut elf = [0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 1;
        elf[18] = 62;
        std::fs::write(&p, elf).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(
            e.ends_with("is an ELF of 32 bits, not a 64-bit x86 (x86-64) kernel"),
            "{e}"
        );
        (elf[4], elf[18]) = (2, 183);
        std::fs::write(&p, elf).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(e.contains("is an ELF for another architecture"), "{e}");
        // A user-space program or library (`/bin/ls`, `libc.so.6`), an
        // object file, and an executable linked below 1 MiB. linux-loader
        // named all of these "Invalid entry address".
        elf[18] = 62;
        for (e_type, entry, want) in [
            (
                3u16,
                0x6ab0u64,
                "is an ELF shared object (a library or a position-independent program), not",
            ),
            (1, 0, "is an ELF relocatable object file (a .o or .ko), not"),
            (4, 0, "is an ELF core dump, not"),
            (
                2,
                0x8000,
                "is an ELF program entered below 1 MiB, where no kernel loads, not",
            ),
        ] {
            elf[16..18].copy_from_slice(&e_type.to_le_bytes());
            elf[24..32].copy_from_slice(&entry.to_le_bytes());
            std::fs::write(&p, elf).unwrap();
            let e = load_kernel(&mem, &p).unwrap_err();
            assert!(matches!(e, BootError::ElfNotX86_64 { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = load_kernel(&mem, &dir.join("missing")).unwrap_err();
        assert!(matches!(e, BootError::KernelIo { .. }), "{e}");
        // A truncated ELF: magic but no valid headers.
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"\x7fELF\x02\x01\x01")
            .unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(matches!(e, BootError::Truncated { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A bzImage of 4 setup sectors and 16 KiB of payload (syssize in
    /// 16-byte units), code at 1 MiB.
    fn small_bzimage() -> Vec<u8> {
        let mut bz = vec![0u8; 5 * 512 + 16 * 1024];
        bz[0x1f1] = 4;
        bz[0x1f4..0x1f8].copy_from_slice(&1024u32.to_le_bytes());
        bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x211] = 1; // LOADED_HIGH
        bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        bz[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        bz[0x260..0x264].copy_from_slice(&(1u32 << 20).to_le_bytes());
        bz
    }

    /// An ELF: header, one program header, a 4 KiB segment at file offset
    /// 0x1000 loaded at 16 MiB, entered at its start.
    fn small_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 0x2000];
        elf[..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5], elf[6]) = (2, 1, 1);
        elf[16..18].copy_from_slice(&2u16.to_le_bytes());
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        for (o, v) in [
            (8, 0x1000u64),
            (16, 0x100_0000),
            (24, 0x100_0000),
            (32, 0x1000),
            (40, 0x1000),
        ] {
            elf[ph + o..ph + o + 8].copy_from_slice(&v.to_le_bytes());
        }
        elf
    }

    /// An image the loader takes but the guest could not start from is
    /// refused by name: linux-loader loaded each of these, and the guest
    /// ran whatever memory held at the entry point.
    #[test]
    fn an_image_entered_outside_what_it_loads_is_refused() {
        let dir = std::env::temp_dir().join(format!("foliovm-boot-entry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vmlinux");
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
        let mut elf = small_elf();
        elf[24..32].copy_from_slice(&0x200_0000u64.to_le_bytes());
        std::fs::write(&p, &elf).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(
            e.ends_with("is entered at 0x2000000, outside what it loads (0x1000000..0x1001000)"),
            "{e}"
        );
        let mut elf = small_elf();
        elf[64] = 2; // PT_DYNAMIC: nothing to load
        std::fs::write(&p, &elf).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(
            e.ends_with("is an ELF with no loadable (PT_LOAD) segment"),
            "{e}"
        );
        // A segment with no bytes in the file (all .bss) loads nothing,
        // but the kernel's end is past it, so an initrd goes above it.
        let mut elf = small_elf();
        elf[64 + 32..64 + 40].copy_from_slice(&0u64.to_le_bytes());
        std::fs::write(&p, &elf).unwrap();
        let k = load_kernel(&mem, &p).unwrap();
        assert_eq!(k.end, GuestAddress(0x100_1000));
        // A bzImage of setup sectors only, whose headers say so
        // (`syssize` 0): not cut short, but nothing to run (the fuzz
        // below found it).
        let mut bz = small_bzimage();
        bz[0x1f4..0x1f8].copy_from_slice(&0u32.to_le_bytes());
        bz.truncate(5 * 512);
        std::fs::write(&p, &bz).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "has no 64-bit kernel code after its setup sectors: it loads \
                 0x100000..0x100000 and is entered at 0x100200"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1500))]
        /// Kernel images with random header bytes (a corrupted download,
        /// a hostile API client): loading one never panics, a refusal
        /// names the image, and an image that loads lies in guest RAM,
        /// entered inside what was loaded.
        #[test]
        fn corrupted_kernel_headers_are_refused_by_name_or_load_within_ram(
            bz in proptest::bool::ANY,
            edits in proptest::collection::vec(
                (0usize..0x268, proptest::prop_oneof![
                    proptest::num::u8::ANY,
                    proptest::strategy::Just(0u8),
                    proptest::strategy::Just(0xffu8),
                ]),
                1..8,
            ),
            cut in proptest::option::of(0usize..0x5000),
        ) {
            const RAM: u64 = 64 << 20;
            let mut img = if bz { small_bzimage() } else { small_elf() };
            for (at, v) in edits {
                // An ELF's headers are its first 120 bytes.
                let at = if bz { at } else { at % 120 };
                img[at] = v;
            }
            if let Some(len) = cut {
                img.truncate(len);
            }
            let dir = std::env::temp_dir().join(format!("foliovm-boot-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("kernel");
            std::fs::write(&p, &img).unwrap();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), RAM as usize)])
                .unwrap();
            let loaded = load_kernel(&mem, &p);
            std::fs::remove_dir_all(&dir).unwrap();
            match loaded {
                Ok(k) => {
                    proptest::prop_assert!(k.end.raw() <= RAM, "{k:?}");
                    proptest::prop_assert!(k.entry.raw() >= HIMEM_START.raw() && k.entry < k.end, "{k:?}");
                }
                Err(e) => {
                    let chain = crate::controller::error_chain(&e);
                    proptest::prop_assert!(chain.contains(p.to_str().unwrap()), "{chain}");
                }
            }
        }
    }

    /// An image cut short (a copy or download that stopped) is named as
    /// such. Before, a bzImage cut in half loaded and the guest
    /// triple-faulted, one cut inside its setup code failed with "Underflow
    /// occurred during an arithmetic operation", and an ELF cut anywhere
    /// with "Unable to read kernel image".
    #[test]
    fn a_truncated_kernel_is_named_as_cut_short() {
        let dir = std::env::temp_dir().join(format!("foliovm-boot-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kernel");
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
        let bz = small_bzimage();
        std::fs::write(&p, &bz).unwrap();
        load_kernel(&mem, &p).expect("the whole bzImage loads");
        let whole = bz.len();
        for len in [whole - 1, whole / 2, 0x300, 0x206] {
            std::fs::write(&p, &bz[..len]).unwrap();
            let e = load_kernel(&mem, &p).unwrap_err().to_string();
            assert!(
                e.ends_with(&format!(
                    "is cut short: it is {len} bytes, and its headers describe {whole}"
                )),
                "{len}: {e}"
            );
        }
        let elf = small_elf();
        std::fs::write(&p, &elf).unwrap();
        load_kernel(&mem, &p).expect("the whole ELF loads");
        for (len, whole) in [(0x1fff, 0x2000), (0x1000, 0x2000), (100, 120), (7, 64)] {
            std::fs::write(&p, &elf[..len]).unwrap();
            let e = load_kernel(&mem, &p).unwrap_err().to_string();
            assert!(
                e.ends_with(&format!(
                    "is cut short: it is {len} bytes, and its headers describe {whole}"
                )),
                "{len}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A kernel or initrd path naming a FIFO (or a terminal, a socket) is
    /// refused at once. Opening a FIFO blocks until a writer comes, and a
    /// boot source comes from an API client: before, an InstanceStart
    /// with one blocked the event loop thread for good, so the API
    /// answered nothing more and SIGTERM went unheard.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("foliovm-boot-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) reads the NUL-terminated path `c` owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 32 << 20)])
                .unwrap();
            // As the API answers it: the error and its causes.
            let chain = |e: BootError| crate::controller::error_chain(&e);
            let _ = tx.send(load_kernel(&mem, &p).map(|_| ()).map_err(chain));
            let initrd = load_initrd(&mem, 32 << 20, HIMEM_START, &p);
            let _ = tx.send(initrd.map(|_| ()).map_err(chain));
        });
        for what in ["kernel", "initrd"] {
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("loading a FIFO as the {what} blocked"));
            let e = r.expect_err("a FIFO is no image");
            assert!(e.contains("not a regular file"), "{what}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
