//! The swap file: a private, preallocated file, read and written a slot
//! (4 KiB) at a time or in contiguous runs, with a CRC32C per slot checked
//! on every read.
//!
//! The file is created `O_TMPFILE` in a directory (`--swap-dir`) or at a
//! path that must not exist yet (`--swap-file`) and is unlinked at once, so
//! no other process can open it and it vanishes with the process. Mode
//! 0600. It is opened `O_DIRECT` (the data lives in our pool already: the
//! page cache would only double it) and preallocated with `fallocate`, so
//! writes do not allocate blocks and ENOSPC cannot happen late.
//!
//! I/O goes through [`SwapFile::read`] and [`SwapFile::write`], which honour
//! a fault-injection plan ([`FaultPlan`]): one relaxed atomic load on the
//! normal path, so tests exercise the real code path and no compile-time
//! switch is needed.
//!
//! Analogue of the swap file side of `mm/swapfile.c` (`swapon`) and of
//! `mm/page_io.c` (`swap_writepage()`, `swap_read_folio()`).

use crate::types::{ShowSize, SwapSlot, PAGE_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Slots per cluster, and so the smallest useful file: 2 MiB.
pub const MIN_SWAP_BYTES: u64 = 2 << 20;
/// The largest swap file: slot numbers ([`SwapSlot`]) are 32 bits, and the
/// last cluster's slots plus a folio's page count must not wrap.
pub const MAX_SWAP_BYTES: u64 = ((1 << 32) - MIN_SWAP_BYTES / PAGE_SIZE) * PAGE_SIZE;

/// Where the swap file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapTarget {
    /// Create this file (it must not exist), then unlink it (`--swap-file`).
    File(PathBuf),
    /// Create an anonymous `O_TMPFILE` in this directory (`--swap-dir`).
    Dir(PathBuf),
}

/// Swap settings of a [`crate::MmConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapConfig {
    /// Where the file goes.
    pub target: SwapTarget,
    /// Its size (`--swap-size`), rounded down to whole 2 MiB clusters.
    pub size_bytes: u64,
}

impl SwapConfig {
    /// Check, without keeping anything, that [`SwapFile::create`] could
    /// make a file for this configuration now: its size, and its directory
    /// (an unnamed file is opened and dropped there) or its path (it must
    /// not exist; a file is created there and unlinked at once). For a VMM
    /// that creates the file only later (when its VM is started through the
    /// API), so that a bad flag is refused at start. Space is not reserved.
    ///
    /// # Errors
    /// See [`SwapFileError`].
    pub fn check(&self) -> Result<(), SwapFileError> {
        usable_size(self)?;
        match &self.target {
            SwapTarget::Dir(d) => open_tmpfile(d).map(drop),
            // Made and unlinked at once, as `create` makes it: a directory
            // that exists but takes no new file (no write permission, a
            // read-only mount) is refused now, not when the VM starts.
            // Never an existing file (`create_new`).
            SwapTarget::File(p) => open_unlinked(p).map(drop),
        }
    }
}

/// Errors creating the swap file.
#[derive(Debug, thiserror::Error)]
pub enum SwapFileError {
    /// The size is below one cluster.
    #[error("swap size {} is below the minimum of {}", ShowSize(*size), ShowSize(*min))]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// The size is above what 32-bit slot numbers address.
    #[error("swap size {} is above the maximum of {}", ShowSize(*size), ShowSize(*max))]
    TooLarge {
        /// Requested size.
        size: u64,
        /// Maximum.
        max: u64,
    },
    /// `--swap-file` names an existing file; it is never overwritten.
    #[error("swap file {0} already exists (it is never overwritten; give a new path, or --swap-dir for a directory to create it in)")]
    Exists(PathBuf),
    /// The file could not be created or opened.
    #[error("cannot create swap file in {0}")]
    Create(PathBuf, #[source] io::Error),
    /// The file system has no room for the whole file.
    #[error("no space for a {size}-byte swap file in {path}")]
    NoSpace {
        /// Where.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// The `fallocate` error.
        #[source]
        source: io::Error,
    },
    /// The size is over what one file may have there (`EFBIG`: the file
    /// system's largest file, or `ulimit -f`); the file system may well
    /// have the space.
    #[error(
        "a swap file of {} is larger than a file in {path} may be (the file system's largest file, or ulimit -f)",
        ShowSize(*size)
    )]
    FileTooLarge {
        /// Where.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// The `fallocate` error.
        #[source]
        source: io::Error,
    },
    /// Preallocation failed for another reason.
    #[error("cannot preallocate swap file in {0}")]
    Allocate(PathBuf, #[source] io::Error),
}

/// Errors of one swap read or write.
#[derive(Debug, thiserror::Error)]
pub enum SwapIoError {
    /// The device reported an error (`EIO` and the like).
    ///
    /// The message names the error itself: it is only ever logged as
    /// `{e}`, which shows no source.
    #[error("swap I/O error at slot {slot}: {error}")]
    Io {
        /// First slot of the request.
        slot: u32,
        /// The error.
        error: io::Error,
    },
    /// The file system is full (only possible for a sparse file).
    #[error("swap file full at slot {0}")]
    NoSpace(u32),
    /// The read ended early (end of file): the data is not there.
    #[error("short swap read at slot {slot}: {done} of {want} bytes")]
    ShortRead {
        /// First slot.
        slot: u32,
        /// Bytes read.
        done: u64,
        /// Bytes wanted.
        want: u64,
    },
    /// Data read back does not match the checksum written with it.
    #[error("swap checksum mismatch on {} of the pages from slot {slot}", bad.len())]
    Checksum {
        /// First slot.
        slot: u32,
        /// Indices (relative to `slot`) of the pages that failed.
        bad: Vec<u16>,
    },
}

/// The I/O direction a [`FaultPlan`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Swapin reads.
    Read,
    /// Swap-out writes.
    Write,
}

/// How long an injected [`InjectedFault::SlowEio`] takes.
pub const SLOW_EIO_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// The syscall fails with `EIO`.
    Eio,
    /// The syscall fails with `EIO` after [`SLOW_EIO_DELAY`], as a device
    /// that times out would: long enough for other threads to meet the
    /// I/O in flight (a refault waiting on the folio lock).
    SlowEio,
    /// The syscall fails with `ENOSPC` (writes only).
    Enospc,
    /// The read returns half the bytes asked for; the rest must be read
    /// by a second call (the code handles genuine short reads this way).
    ShortRead,
    /// The read returns 0 bytes: end of file.
    Truncated,
    /// The read succeeds but one byte of the first page is flipped, as a
    /// corrupting device would: the checksum must catch it.
    Corrupt,
    /// The I/O succeeds after this long, as on a slow or congested device
    /// (not a failure: it holds swap I/O in flight for as long as a test
    /// needs to meet it there).
    Delay(std::time::Duration),
}

/// A fault-injection plan: after `skip` matching I/Os, inject `fault` into
/// the next `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Which I/Os.
    pub op: IoOp,
    /// What to inject.
    pub fault: InjectedFault,
    /// Matching I/Os to let through first.
    pub skip: u64,
    /// Faults to inject.
    pub count: u64,
}

/// A [`FaultPlan`] naming a fault its I/O cannot have (see
/// [`SwapFile::set_fault_plans`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fault plan {0:?}: a {op:?} cannot fail that way", op = .0.op)]
pub struct ImpossibleFaultPlan(pub FaultPlan);

/// I/O counters of the swap file.
#[derive(Debug, Default)]
pub struct SwapIoCounters {
    /// Read requests and bytes.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Short transfers continued with another syscall.
    pub short_retries: AtomicU64,
    /// Errors (all kinds, including checksum mismatches).
    pub errors: AtomicU64,
    /// Faults injected.
    pub injected: AtomicU64,
}

/// The open swap file.
#[derive(Debug)]
pub struct SwapFile {
    file: File,
    nr_slots: u64,
    direct: bool,
    in_memory: bool,
    plans: Mutex<Vec<FaultPlan>>,
    armed: AtomicBool,
    /// Counters.
    pub counters: SwapIoCounters,
}

/// The checksum of one page.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32c::crc32c(page)
}

impl SwapFile {
    /// Create, unlink and preallocate the swap file.
    ///
    /// # Errors
    /// See [`SwapFileError`].
    pub fn create(config: &SwapConfig) -> Result<SwapFile, SwapFileError> {
        let size = usable_size(config)?;
        let (file, direct, where_) = match &config.target {
            SwapTarget::File(p) => open_unlinked(p)?,
            SwapTarget::Dir(d) => open_tmpfile(d)?,
        };
        // SAFETY: fallocate takes no pointers; the fd is owned by `file`.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOSPC) => SwapFileError::NoSpace {
                    path: where_,
                    size,
                    source: e,
                },
                Some(libc::EFBIG) => SwapFileError::FileTooLarge {
                    path: where_,
                    size,
                    source: e,
                },
                _ => SwapFileError::Allocate(where_, e),
            });
        }
        let in_memory = on_memory_fs(&file);
        Ok(SwapFile {
            file,
            nr_slots: size / PAGE_SIZE,
            direct,
            in_memory,
            plans: Mutex::default(),
            armed: AtomicBool::new(false),
            counters: SwapIoCounters::default(),
        })
    }

    /// Slots in the file.
    pub fn nr_slots(&self) -> u64 {
        self.nr_slots
    }

    /// Whether the file is read and written with `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// Whether the file lives in host memory (tmpfs, ramfs): what is
    /// swapped out to it still takes host RAM.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Replace the fault-injection plans (an empty list disarms injection).
    ///
    /// # Errors
    /// [`ImpossibleFaultPlan`], and the plans are unchanged, if a plan names
    /// a fault its I/O cannot have: a short, truncated or corrupted write,
    /// or a read that runs out of space. Such a plan would be counted as
    /// injected and change nothing, and a test armed with it would pass
    /// without testing anything.
    pub fn set_fault_plans(&self, plans: Vec<FaultPlan>) -> Result<(), ImpossibleFaultPlan> {
        use InjectedFault::*;
        for p in &plans {
            let fits = match p.op {
                IoOp::Read => p.fault != Enospc,
                IoOp::Write => matches!(p.fault, Eio | SlowEio | Enospc | Delay(_)),
            };
            if !fits {
                return Err(ImpossibleFaultPlan(*p));
            }
        }
        let mut p = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        self.armed.store(!plans.is_empty(), Relaxed);
        *p = plans;
        Ok(())
    }

    fn injected(&self, op: IoOp) -> Option<InjectedFault> {
        if !self.armed.load(Relaxed) {
            return None;
        }
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let p = plans.iter_mut().find(|p| p.op == op && p.count > 0)?;
        if p.skip > 0 {
            p.skip -= 1;
            return None;
        }
        p.count -= 1;
        self.counters.injected.fetch_add(1, Relaxed);
        Some(p.fault)
    }

    /// Read the slots `[slot, slot + buf.len() / 4 KiB)` into `buf` and check
    /// each page against `crcs`.
    ///
    /// # Errors
    /// See [`SwapIoError`]; on [`SwapIoError::Checksum`] the other pages of
    /// `buf` are good.
    ///
    /// # Context
    /// No locks held except the folio lock of the folio `buf` belongs to.
    pub fn read(&self, slot: SwapSlot, buf: &mut [u8], crcs: &[u32]) -> Result<(), SwapIoError> {
        debug_assert_eq!(buf.len() as u64, crcs.len() as u64 * PAGE_SIZE);
        let c = &self.counters;
        c.reads.fetch_add(1, Relaxed);
        let r = self.read_all(slot, buf);
        if r.is_ok() {
            c.read_bytes.fetch_add(buf.len() as u64, Relaxed);
        }
        let r = r.and_then(|()| {
            let bad: Vec<u16> = buf
                .chunks(PAGE_SIZE as usize)
                .zip(crcs)
                .enumerate()
                .filter(|(_, (page, &want))| page_crc(page) != want)
                .map(|(i, _)| i as u16)
                .collect();
            match bad.is_empty() {
                true => Ok(()),
                false => Err(SwapIoError::Checksum { slot: slot.0, bad }),
            }
        });
        if r.is_err() {
            c.errors.fetch_add(1, Relaxed);
        }
        r
    }

    fn read_all(&self, slot: SwapSlot, buf: &mut [u8]) -> Result<(), SwapIoError> {
        let fault = self.injected(IoOp::Read);
        if let Some(InjectedFault::Delay(d)) = fault {
            std::thread::sleep(d);
        }
        let want = buf.len();
        let mut done = 0;
        let mut first = true;
        while done < want {
            let n = match (first, fault) {
                (true, Some(InjectedFault::Eio)) => Err(io::Error::from_raw_os_error(libc::EIO)),
                (true, Some(InjectedFault::SlowEio)) => {
                    std::thread::sleep(SLOW_EIO_DELAY);
                    Err(io::Error::from_raw_os_error(libc::EIO))
                }
                (true, Some(InjectedFault::Enospc)) => {
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }
                (true, Some(InjectedFault::Truncated)) => Ok(0),
                (true, Some(InjectedFault::ShortRead)) => {
                    // Half, keeping O_DIRECT's 512-byte granularity.
                    let half = match want > PAGE_SIZE as usize {
                        true => want / 2 / PAGE_SIZE as usize * PAGE_SIZE as usize,
                        false => want / 2,
                    };
                    self.file.read_at(&mut buf[..half], slot.to_offset())
                }
                _ => self
                    .file
                    .read_at(&mut buf[done..], slot.to_offset() + done as u64),
            };
            first = false;
            match n {
                Ok(0) => {
                    return Err(SwapIoError::ShortRead {
                        slot: slot.0,
                        done: done as u64,
                        want: want as u64,
                    })
                }
                Ok(n) => {
                    done += n;
                    if done < want {
                        self.counters.short_retries.fetch_add(1, Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(SwapIoError::Io {
                        slot: slot.0,
                        error,
                    })
                }
            }
        }
        if fault == Some(InjectedFault::Corrupt) {
            buf[17] ^= 0x5a;
        }
        Ok(())
    }

    /// Write `pages` (each a whole number of 4 KiB pages, in order) to
    /// consecutive slots from `slot`, with one `pwritev` where possible.
    /// Returns the checksum of every page written, for the swap map.
    ///
    /// # Errors
    /// See [`SwapIoError`]; nothing written may be trusted then.
    ///
    /// # Context
    /// No locks held except the folio locks of the folios written.
    pub fn write(&self, slot: SwapSlot, pages: &[&[u8]]) -> Result<Vec<u32>, SwapIoError> {
        let c = &self.counters;
        c.writes.fetch_add(1, Relaxed);
        let crcs = pages
            .iter()
            .flat_map(|b| b.chunks(PAGE_SIZE as usize))
            .map(page_crc)
            .collect();
        let total: usize = pages.iter().map(|b| b.len()).sum();
        let r = match self.injected(IoOp::Write) {
            Some(InjectedFault::Enospc) => Err(SwapIoError::NoSpace(slot.0)),
            Some(f @ (InjectedFault::Eio | InjectedFault::SlowEio)) => {
                if f == InjectedFault::SlowEio {
                    std::thread::sleep(SLOW_EIO_DELAY);
                }
                Err(SwapIoError::Io {
                    slot: slot.0,
                    error: io::Error::from_raw_os_error(libc::EIO),
                })
            }
            Some(InjectedFault::Delay(d)) => {
                std::thread::sleep(d);
                self.write_all(slot, pages, total)
            }
            _ => self.write_all(slot, pages, total),
        };
        match r {
            Ok(()) => {
                c.write_bytes.fetch_add(total as u64, Relaxed);
                Ok(crcs)
            }
            Err(e) => {
                c.errors.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    fn write_all(&self, slot: SwapSlot, pages: &[&[u8]], total: usize) -> Result<(), SwapIoError> {
        let err = |error: io::Error| match error.raw_os_error() {
            Some(libc::ENOSPC) => SwapIoError::NoSpace(slot.0),
            _ => SwapIoError::Io {
                slot: slot.0,
                error,
            },
        };
        let iov: Vec<libc::iovec> = pages
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live borrowed slice for its
        // length; pwritev only reads them. Too many iovecs fail with EINVAL.
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len().min(libc::c_int::MAX as usize) as libc::c_int,
                slot.to_offset() as libc::off_t,
            )
        };
        // Interrupted before it wrote anything (only a FUSE or NFS file
        // would be): nothing is written, and the buffer-by-buffer writes
        // below, which retry `EINTR`, do it all.
        let mut done = match n {
            0.. => n as usize,
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => 0,
                e => return Err(err(e)),
            },
        };
        // A short vectored write: finish buffer by buffer.
        if done < total {
            self.counters.short_retries.fetch_add(1, Relaxed);
        }
        let mut start = 0;
        for b in pages {
            let end = start + b.len();
            if done < end {
                let from = done.max(start) - start;
                let off = slot.to_offset() + done as u64;
                self.file.write_all_at(&b[from..], off).map_err(err)?;
                done = end;
            }
            start = end;
        }
        Ok(())
    }
}

/// `config`'s size rounded down to whole clusters, at least one.
fn usable_size(config: &SwapConfig) -> Result<u64, SwapFileError> {
    let size = config.size_bytes / MIN_SWAP_BYTES * MIN_SWAP_BYTES;
    if size < MIN_SWAP_BYTES {
        return Err(SwapFileError::TooSmall {
            size: config.size_bytes,
            min: MIN_SWAP_BYTES,
        });
    }
    if size > MAX_SWAP_BYTES {
        return Err(SwapFileError::TooLarge {
            size: config.size_bytes,
            max: MAX_SWAP_BYTES,
        });
    }
    Ok(size)
}

/// Open `path` as a new file (never an existing one), then unlink it.
fn open_unlinked(path: &Path) -> Result<(File, bool, PathBuf), SwapFileError> {
    let open = |direct: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 })
            .open(path)
    };
    let (file, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(SwapFileError::Exists(path.to_owned()))
        }
        // No O_DIRECT on this file system (tmpfs): buffered I/O.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let _ = std::fs::remove_file(path);
            (open(false).map_err(|e| create_err(path, e))?, false)
        }
        Err(e) => return Err(create_err(path, e)),
    };
    std::fs::remove_file(path).map_err(|e| create_err(path, e))?;
    Ok((file, direct, path.to_owned()))
}

/// Open an unnamed `O_TMPFILE` in `dir`, or a named one unlinked at once
/// where the file system lacks `O_TMPFILE`.
fn open_tmpfile(dir: &Path) -> Result<(File, bool, PathBuf), SwapFileError> {
    let open = |direct: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(
                libc::O_TMPFILE | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 },
            )
            .open(dir)
    };
    match open(true) {
        Ok(f) => return Ok((f, true, dir.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if let Ok(f) = open(false) {
                return Ok((f, false, dir.to_owned()));
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        Err(e) => return Err(create_err(dir, e)),
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        ".foliovm-swap-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Relaxed)
    );
    let (f, direct, _) = open_unlinked(&dir.join(name))?;
    Ok((f, direct, dir.to_owned()))
}

/// Whether `file` is on a file system kept in memory (tmpfs, ramfs).
fn on_memory_fs(file: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs(2) writes one `statfs` into the buffer we own and
    // reads nothing but the fd, which `file` keeps open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it filled the whole struct.
    let kind = unsafe { st.assume_init() }.f_type;
    // ramfs's magic (linux/magic.h), which libc does not name.
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    kind == libc::TMPFS_MAGIC || kind == RAMFS_MAGIC
}

fn create_err(path: &Path, e: io::Error) -> SwapFileError {
    SwapFileError::Create(path.to_owned(), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_config(size: u64) -> SwapConfig {
        SwapConfig {
            target: SwapTarget::Dir(std::env::temp_dir()),
            size_bytes: size,
        }
    }

    /// A page-aligned buffer (O_DIRECT needs one).
    struct Aligned(*mut u8, usize);
    impl Aligned {
        fn new(pages: usize) -> Aligned {
            let layout = std::alloc::Layout::from_size_align(pages * 4096, 4096).unwrap();
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!p.is_null());
            Aligned(p, pages * 4096)
        }
    }
    impl std::ops::Deref for Aligned {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            // SAFETY: `self.0` is a live allocation of `self.1` bytes owned by self.
            unsafe { std::slice::from_raw_parts(self.0, self.1) }
        }
    }
    impl std::ops::DerefMut for Aligned {
        fn deref_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
            unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
        }
    }
    impl Drop for Aligned {
        fn drop(&mut self) {
            let layout = std::alloc::Layout::from_size_align(self.1, 4096).unwrap();
            // SAFETY: allocated in `new` with this very layout.
            unsafe { std::alloc::dealloc(self.0, layout) }
        }
    }

    #[test]
    fn too_small_and_existing_files_are_refused() {
        let e = SwapFile::create(&tmp_config(4096)).unwrap_err();
        assert!(matches!(e, SwapFileError::TooSmall { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "swap size 4 KiB is below the minimum of 2 MiB",
            "sizes are shown in the units a user gives them in"
        );
        let path = std::env::temp_dir().join(format!("foliovm-exists-{}", std::process::id()));
        std::fs::write(&path, b"precious").unwrap();
        let cfg = SwapConfig {
            target: SwapTarget::File(path.clone()),
            size_bytes: MIN_SWAP_BYTES,
        };
        assert!(matches!(
            SwapFile::create(&cfg),
            Err(SwapFileError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        let nodir = SwapConfig {
            target: SwapTarget::Dir("/nonexistent/foliovm".into()),
            size_bytes: MIN_SWAP_BYTES,
        };
        let e = SwapFile::create(&nodir).unwrap_err();
        assert!(matches!(e, SwapFileError::Create(..)), "{e}");
        let huge = tmp_config(MAX_SWAP_BYTES + MIN_SWAP_BYTES);
        let e = SwapFile::create(&huge).unwrap_err();
        assert!(matches!(e, SwapFileError::TooLarge { .. }), "{e}");
    }

    /// A swap file on tmpfs says it is in memory; one on a disk does not.
    #[test]
    fn a_swap_file_in_host_memory_is_told_apart() {
        let in_dir = |d: &str| SwapConfig {
            target: SwapTarget::Dir(d.into()),
            size_bytes: MIN_SWAP_BYTES,
        };
        let shm = SwapFile::create(&in_dir("/dev/shm")).expect("a swap file in /dev/shm");
        assert!(shm.in_memory(), "/dev/shm is tmpfs");
        let disk = SwapFile::create(&in_dir("/var/tmp")).expect("a swap file in /var/tmp");
        assert!(!disk.in_memory(), "/var/tmp is on a disk");
        assert!(disk.direct_io());
    }

    #[test]
    fn a_write_plan_that_would_change_nothing_is_refused() {
        let f = SwapFile::create(&tmp_config(MIN_SWAP_BYTES)).unwrap();
        let plan = FaultPlan {
            op: IoOp::Write,
            fault: InjectedFault::Corrupt,
            skip: 0,
            count: 1,
        };
        let e = f.set_fault_plans(vec![plan]).unwrap_err();
        assert_eq!(e, ImpossibleFaultPlan(plan));
        assert!(
            e.to_string().contains("a Write cannot fail that way"),
            "{e}"
        );
    }

    #[test]
    fn check_refuses_what_create_would_without_making_a_file() {
        let tmp = std::env::temp_dir();
        assert!(SwapConfig::check(&tmp_config(MIN_SWAP_BYTES)).is_ok());
        assert!(matches!(
            SwapConfig::check(&tmp_config(4096)),
            Err(SwapFileError::TooSmall { .. })
        ));
        assert!(matches!(
            SwapConfig::check(&tmp_config(u64::MAX)),
            Err(SwapFileError::TooLarge { .. })
        ));
        let nodir = SwapConfig {
            target: SwapTarget::Dir("/nonexistent/foliovm".into()),
            size_bytes: MIN_SWAP_BYTES,
        };
        assert!(matches!(
            SwapConfig::check(&nodir),
            Err(SwapFileError::Create(..))
        ));
        let path = tmp.join(format!("foliovm-check-{}", std::process::id()));
        let file = SwapConfig {
            target: SwapTarget::File(path.clone()),
            size_bytes: MIN_SWAP_BYTES,
        };
        SwapConfig::check(&file).unwrap();
        assert!(!path.exists(), "check made no file");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            SwapConfig::check(&file),
            Err(SwapFileError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        let in_missing_dir = SwapConfig {
            target: SwapTarget::File("/nonexistent/foliovm/swap".into()),
            size_bytes: MIN_SWAP_BYTES,
        };
        assert!(matches!(
            SwapConfig::check(&in_missing_dir),
            Err(SwapFileError::Create(..))
        ));
    }

    /// A path whose directory takes no new file is refused by `check`, as
    /// `create` would refuse it: /sys lets nobody, root included, create
    /// a file at its top.
    #[test]
    fn check_refuses_a_path_where_no_file_can_be_created() {
        let cfg = SwapConfig {
            target: SwapTarget::File("/sys/foliovm-check-swap".into()),
            size_bytes: MIN_SWAP_BYTES,
        };
        let e = SwapFile::create(&cfg).unwrap_err();
        assert!(matches!(e, SwapFileError::Create(..)), "{e}");
        let e = cfg.check().expect_err("create fails there");
        assert!(matches!(e, SwapFileError::Create(..)), "{e}");
    }

    /// A size over what one file may have there (`ulimit -f`, or a file
    /// system's largest file: 4 GiB on FAT) is told apart from a full
    /// file system: `fallocate` fails with EFBIG, not ENOSPC. Run in a
    /// child process with RLIMIT_FSIZE at 1 MiB and SIGXFSZ ignored.
    #[test]
    fn a_file_size_limit_is_not_reported_as_a_full_disk() {
        const CHILD: &str = "FOLIOVM_SWAP_FSIZE_CHILD";
        const NAME: &str = "swap_file::tests::a_file_size_limit_is_not_reported_as_a_full_disk";
        if std::env::var_os(CHILD).is_some() {
            let e = SwapFile::create(&tmp_config(2 * MIN_SWAP_BYTES)).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, SwapFileError::FileTooLarge { .. }), "{msg}");
            assert!(!msg.contains("no space"), "{msg}");
            assert!(msg.contains("4 MiB"), "{msg}");
            return;
        }
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env(CHILD, "1");
        // SAFETY: between fork and exec only setrlimit and signal, which
        // are async-signal-safe and touch no memory of the parent's.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran the test: {text}");
    }

    /// The swap-out and swapin paths log a failed I/O as `{e}`
    /// (`vmscan::pageout`, `swapin::read_folio`): the message must name
    /// the OS error, or EIO, EINVAL (an O_DIRECT misalignment) and EBADF
    /// all read "swap I/O error at slot N".
    #[test]
    fn a_logged_swap_io_error_names_its_cause() {
        let f = SwapFile::create(&tmp_config(MIN_SWAP_BYTES)).unwrap();
        let eio = io::Error::from_raw_os_error(libc::EIO).to_string();
        let once = |op| FaultPlan {
            op,
            fault: InjectedFault::Eio,
            skip: 0,
            count: 1,
        };
        f.set_fault_plans(vec![once(IoOp::Read), once(IoOp::Write)])
            .unwrap();
        let mut page = Aligned::new(1);
        let logged = format!("{}", f.read(SwapSlot(3), &mut page, &[0]).unwrap_err());
        assert!(logged.contains(&eio), "{logged}");
        let logged = format!("{}", f.write(SwapSlot(3), &[&page]).unwrap_err());
        assert!(logged.contains(&eio), "{logged}");
    }

    #[test]
    fn named_file_is_private_and_unlinked() {
        let path = std::env::temp_dir().join(format!("foliovm-named-{}", std::process::id()));
        let cfg = SwapConfig {
            target: SwapTarget::File(path.clone()),
            size_bytes: 3 * MIN_SWAP_BYTES + 5,
        };
        let f = SwapFile::create(&cfg).unwrap();
        assert!(!path.exists(), "unlinked at once");
        assert_eq!(f.nr_slots(), 3 * 512);
        use std::os::unix::fs::MetadataExt;
        let meta = f.file.metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.nlink(), 0);
    }

    #[test]
    fn roundtrip_checksums_and_injected_faults() {
        let f = SwapFile::create(&tmp_config(MIN_SWAP_BYTES)).unwrap();
        let mut a = Aligned::new(2);
        a.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let mut b = Aligned::new(1);
        b.fill(7);
        let crcs = f.write(SwapSlot(4), &[&a, &b]).unwrap();
        assert_eq!(crcs.len(), 3);
        let mut r = Aligned::new(3);
        f.read(SwapSlot(4), &mut r, &crcs).unwrap();
        assert_eq!(&r[..8192], &a[..]);
        assert_eq!(&r[8192..], &b[..]);

        let plan = |op, fault| FaultPlan {
            op,
            fault,
            skip: 0,
            count: 1,
        };
        f.set_fault_plans(vec![plan(IoOp::Read, InjectedFault::ShortRead)])
            .unwrap();
        r.fill(0);
        f.read(SwapSlot(4), &mut r, &crcs).unwrap();
        assert_eq!(&r[..8192], &a[..], "a short read is continued");
        assert!(f.counters.short_retries.load(Relaxed) >= 1);

        f.set_fault_plans(vec![plan(IoOp::Read, InjectedFault::Corrupt)])
            .unwrap();
        match f.read(SwapSlot(4), &mut r, &crcs) {
            Err(SwapIoError::Checksum { bad, .. }) => assert_eq!(bad, vec![0]),
            other => panic!("{other:?}"),
        }
        f.set_fault_plans(vec![plan(IoOp::Read, InjectedFault::Truncated)])
            .unwrap();
        assert!(matches!(
            f.read(SwapSlot(4), &mut r, &crcs),
            Err(SwapIoError::ShortRead { done: 0, .. })
        ));
        f.set_fault_plans(vec![plan(IoOp::Read, InjectedFault::Eio)])
            .unwrap();
        assert!(matches!(
            f.read(SwapSlot(4), &mut r, &crcs),
            Err(SwapIoError::Io { .. })
        ));
        f.set_fault_plans(vec![plan(IoOp::Write, InjectedFault::Enospc)])
            .unwrap();
        assert!(matches!(
            f.write(SwapSlot(0), &[&b]),
            Err(SwapIoError::NoSpace(0))
        ));
        // A delayed I/O takes its delay and then does what it was asked.
        let delay = std::time::Duration::from_millis(50);
        for op in [IoOp::Write, IoOp::Read] {
            f.set_fault_plans(vec![plan(op, InjectedFault::Delay(delay))])
                .unwrap();
            let t0 = std::time::Instant::now();
            match op {
                IoOp::Write => assert_eq!(f.write(SwapSlot(8), &[&a]).unwrap(), crcs[..2]),
                IoOp::Read => {
                    r.fill(0);
                    f.read(SwapSlot(8), &mut r[..8192], &crcs[..2]).unwrap();
                    assert_eq!(&r[..8192], &a[..], "a delayed read");
                }
            }
            assert!(t0.elapsed() >= delay, "{op:?} not delayed");
        }
        // Plans are used up: I/O works again.
        f.read(SwapSlot(4), &mut r, &crcs).unwrap();
        // A wrong checksum list is a mismatch, never silently accepted.
        let mut wrong = crcs.clone();
        wrong[2] ^= 1;
        assert!(matches!(
            f.read(SwapSlot(4), &mut r, &wrong),
            Err(SwapIoError::Checksum { ref bad, .. }) if bad == &[2]
        ));
    }
}
