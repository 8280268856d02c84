//! Raw userfaultfd: the few ioctls the memory manager uses, including
//! `UFFDIO_MOVE` (Linux 6.8), which the `userfaultfd` crate lacks.
//!
//! Numbers are computed from the uapi struct sizes with the `_IOC` encoding
//! and checked in tests against the values the C headers produce
//! (`UFFDIO_MOVE` = `_IOWR(0xAA, 0x05, struct uffdio_move)` = `0xc028aa05`).

use crate::types::PAGE_SIZE;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFDIO: u32 = 0xAA;
/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;

const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr) as u64
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn iowr(nr: u32, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}
const fn ior(nr: u32, size: usize) -> u64 {
    ioc(IOC_READ, nr, size)
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}
/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// `struct uffdio_move`.
#[repr(C)]
#[derive(Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_MOVE: u64 = iowr(0x05, std::mem::size_of::<UffdioMove>());
/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}
const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<UffdioPoison>());
/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFDIO_COPY_MODE_WP`: the new page is write-protected.
pub const COPY_MODE_WP: u64 = 1 << 1;
/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

/// `UFFD_FEATURE_MOVE`.
pub const FEATURE_MOVE: u64 = 1 << 16;
/// `UFFD_FEATURE_SIGBUS`: faults raise `SIGBUS` instead of sending a message.
pub const FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFD_FEATURE_POISON`.
pub const FEATURE_POISON: u64 = 1 << 14;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 2;
/// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`.
pub const MOVE_MODE_ALLOW_SRC_HOLES: u64 = 2;
/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write to a write-protected page.
pub const PAGEFAULT_FLAG_WP: u64 = 2;

/// `struct uffd_msg`, as read from the fd (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For page faults: `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// For page faults: the faulting address.
    pub address: u64,
    feat: u64,
}

/// An open userfaultfd, with `UFFD_API` done.
#[derive(Debug)]
pub struct RawUffd {
    fd: OwnedFd,
}

/// Outcome of a failed fill ioctl: bytes done before the error, and the errno.
#[derive(Debug)]
pub struct PartialFill {
    /// Bytes moved/copied before the failure.
    pub done: u64,
    /// The errno (`EAGAIN` means "short, call again for the rest").
    pub errno: i32,
}

impl RawUffd {
    /// Open a non-blocking userfaultfd that also sees kernel-mode faults
    /// (no `UFFD_USER_MODE_ONLY`: KVM and the kernel fault on guest memory),
    /// and enable `features`.
    ///
    /// # Errors
    /// The errno of opening `/dev/userfaultfd` (or the syscall) or of `UFFDIO_API`.
    pub fn open(features: u64) -> io::Result<RawUffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value.
            Ok(dev) => unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) },
            // SAFETY: the userfaultfd syscall takes only flags.
            Err(_) => unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as libc::c_int },
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let uffd = RawUffd { fd };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the struct type that `req` encodes, so
        // the kernel reads and writes exactly `size_of::<T>()` bytes of `arg`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The raw fd, for poll.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Register `[start, start+len)` with `mode` (`REGISTER_MODE_*`).
    ///
    /// # Errors
    /// The errno of `UFFDIO_REGISTER`.
    ///
    /// # Safety
    /// Until the range is unregistered or unmapped, the kernel no longer
    /// answers its faults itself (a hole for `REGISTER_MODE_MISSING`, a
    /// write to a page write-protected through this fd for
    /// `REGISTER_MODE_WP`): the faulting thread waits for whoever serves
    /// this fd, or with [`FEATURE_SIGBUS`] gets `SIGBUS`, and a
    /// kernel-mode access (a `read(2)` into the range) fails with `EFAULT`.
    /// Any holder of the fd may also poison its holes
    /// ([`RawUffd::poison`]). On memory that other code uses (the heap, a
    /// stack, a library's mapping) that hangs or kills threads that did
    /// nothing wrong, so the range must be a private anonymous mapping
    /// the caller made for this and owns outright, whose faults it serves
    /// for as long as the range stays registered.
    ///
    /// ```compile_fail,E0133
    /// // Registering needs an `unsafe` block and its contract.
    /// use mem::sys::userfaultfd::{RawUffd, REGISTER_MODE_MISSING};
    /// let heap = vec![0u8; 1 << 20];
    /// let u = RawUffd::open(0).unwrap();
    /// let _ = u.register(heap.as_ptr() as usize & !4095, 4096, REGISTER_MODE_MISSING);
    /// ```
    pub unsafe fn register(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    /// Unregister `[start, start+len)`, waking any thread still blocked in it.
    ///
    /// # Errors
    /// The errno of `UFFDIO_UNREGISTER`.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Wake threads blocked on faults in `[start, start+len)`.
    ///
    /// # Errors
    /// The errno of `UFFDIO_WAKE`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// `UFFDIO_MOVE`: move the pages of `[src, src+len)` to `[dst, dst+len)`
    /// and wake waiters on the moved part of `dst`.
    ///
    /// A call that stops short is checked against the page tables, because
    /// the kernel's count can be short (seen on 6.18; the test
    /// `move_reports_every_page_it_moved_under_racing_pte_changes`
    /// reproduces it). In `move_pages()` (mm/userfaultfd.c) a PTE step that
    /// returns `-EAGAIN` (a PTE changed under it: an accessed bit set or
    /// cleared by another CPU is enough) leaves `err` set, and it is never
    /// cleared: the next step moves its pages, is taken for another
    /// `-EAGAIN` and not counted, and the step after it finds the
    /// destination populated and ends the call with `-EEXIST`. Trusting
    /// that count left pages moved while our tables said they were not:
    /// a guest entry `Present` whose page sat in the pool, the state
    /// `fault::restore_unbacked` had to repair, and once guest data lost.
    /// So after a short call, the pages after the reported ones that left
    /// `src` (and, without [`MOVE_MODE_ALLOW_SRC_HOLES`], arrived at `dst`)
    /// are counted as moved, their waiters are woken as the kernel would
    /// have, and the rest is reported as `EAGAIN`: the kernel never tried
    /// it. [`move_undercounts`] counts the calls corrected.
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes moved and the errno.
    ///
    /// # Safety
    /// The caller owns both ranges: no Rust reference may point into either,
    /// since the pages leave `src` (which then reads as a hole) and appear
    /// at `dst`.
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: u64,
        mode: u64,
    ) -> Result<(), PartialFill> {
        let mut m = UffdioMove {
            dst: dst as u64,
            src: src as u64,
            len,
            mode,
            moved: 0,
        };
        let r = self.ioctl(UFFDIO_MOVE, &mut m);
        let Err(e) = r else { return Ok(()) };
        let reported = (m.moved.max(0) as u64).min(len);
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let off = reported as usize;
        let lost = uncounted_moves(dst + off, src + off, len - reported, mode);
        if lost == 0 {
            return Err(PartialFill {
                done: reported,
                errno,
            });
        }
        MOVE_UNDERCOUNTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The kernel wakes waiters on the part it counted only.
        let _ = self.wake(dst + off, lost as usize);
        match reported + lost == len {
            true => Ok(()),
            false => Err(PartialFill {
                done: reported + lost,
                errno: libc::EAGAIN,
            }),
        }
    }

    /// [`RawUffd::move_pages`], called again for the rest while it stops
    /// short with `EAGAIN` or `EBUSY` (a raced or busy PTE), at most `tries`
    /// calls in all.
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes moved in all and the last errno.
    ///
    /// # Safety
    /// As [`RawUffd::move_pages`].
    pub unsafe fn move_retrying(
        &self,
        dst: usize,
        src: usize,
        len: u64,
        mode: u64,
        tries: u32,
    ) -> Result<(), PartialFill> {
        let mut done = 0u64;
        let mut errno = libc::EBUSY;
        for _ in 0..tries {
            let off = done as usize;
            // SAFETY: the caller owns both ranges (our contract); the part
            // already moved is not asked again.
            match unsafe { self.move_pages(dst + off, src + off, len - done, mode) } {
                Ok(()) => return Ok(()),
                Err(p) => {
                    done += p.done;
                    errno = p.errno;
                    if errno != libc::EAGAIN && errno != libc::EBUSY {
                        break;
                    }
                }
            }
        }
        Err(PartialFill { done, errno })
    }

    /// `UFFDIO_COPY` of `[src, src+len)` into the registered `dst` range, waking waiters.
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes copied and the errno.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes and `dst` must be owned by
    /// the caller with no Rust reference into it.
    pub unsafe fn copy(&self, dst: usize, src: usize, len: u64) -> Result<(), PartialFill> {
        // SAFETY: the caller's contract is ours.
        unsafe { self.copy_mode(dst, src, len, 0) }
    }

    /// [`RawUffd::copy`] with `mode` (`COPY_MODE_WP`: the new pages are
    /// write-protected, and a write to them raises a WP fault).
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes copied and the errno.
    ///
    /// # Safety
    /// As [`RawUffd::copy`].
    pub unsafe fn copy_mode(
        &self,
        dst: usize,
        src: usize,
        len: u64,
        mode: u64,
    ) -> Result<(), PartialFill> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        self.ioctl(UFFDIO_COPY, &mut c).map_err(|e| PartialFill {
            done: c.copy.max(0) as u64,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })
    }

    /// `UFFDIO_WRITEPROTECT` of the WP-registered range `[start, start+len)`:
    /// protect it, or (`protect == false`) lift the protection and wake the
    /// writers blocked on it.
    ///
    /// # Errors
    /// The errno of `UFFDIO_WRITEPROTECT`.
    pub fn write_protect(&self, start: usize, len: u64, protect: bool) -> io::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // Changing protections moves no data and cannot invalidate any Rust
        // reference; the write faults it causes can only be in a range
        // registered WP, whose registrant serves them (the contract of
        // `register`), so this needs no unsafe contract of its own.
        self.ioctl(UFFDIO_WRITEPROTECT, &mut w)
    }

    /// `UFFDIO_ZEROPAGE` on the registered range `[dst, dst+len)`, waking waiters.
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes filled and the errno.
    pub fn zeropage(&self, dst: usize, len: u64) -> Result<(), PartialFill> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len,
            },
            mode: 0,
            zeropage: 0,
        };
        // Filling a hole with the zero page cannot invalidate any Rust
        // reference: the range had no page, so nothing pointed at data there.
        self.ioctl(UFFDIO_ZEROPAGE, &mut z)
            .map_err(|e| PartialFill {
                done: z.zeropage.max(0) as u64,
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            })
    }

    /// `UFFDIO_POISON` on the registered hole `[dst, dst+len)`, waking
    /// waiters: accesses get `SIGBUS` (KVM: an `-EHWPOISON` memory fault)
    /// until the range is zapped (`MADV_DONTNEED`).
    ///
    /// # Errors
    /// [`PartialFill`] with the bytes done and the errno.
    ///
    /// # Safety
    /// From now on every access to the range is a memory error (`SIGBUS`;
    /// `EFAULT` for a kernel-mode access) where the hole read as zero, or
    /// faulted to this fd, before. The kernel takes any hole of any range
    /// registered on a userfaultfd, the pool's included, so the range must
    /// be a hole of guest memory the caller owns for the call (under the
    /// page-table lock that covers it) whose contents are lost, so that a
    /// memory error is the answer its accesses must get; never memory
    /// that Rust code reads (the pool, through [`crate::pool::Pool::pages_mut`]).
    ///
    /// ```compile_fail,E0133
    /// // Poisoning needs an `unsafe` block and its contract.
    /// use mem::sys::userfaultfd::{RawUffd, FEATURE_POISON};
    /// let u = RawUffd::open(FEATURE_POISON).unwrap();
    /// let _ = u.poison(0x1000, 4096);
    /// ```
    pub unsafe fn poison(&self, dst: usize, len: u64) -> Result<(), PartialFill> {
        let mut p = UffdioPoison {
            range: UffdioRange {
                start: dst as u64,
                len,
            },
            mode: 0,
            updated: 0,
        };
        // The marker goes into a hole only (EEXIST otherwise), so no data
        // is lost; what it does to later accesses is the caller's contract.
        self.ioctl(UFFDIO_POISON, &mut p).map_err(|e| PartialFill {
            done: p.updated.max(0) as u64,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })
    }

    /// Read up to `buf.len()` pending messages without blocking; returns how
    /// many were read (0 if none was pending).
    ///
    /// # Errors
    /// The errno of `read(2)` other than `EAGAIN`.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is a live, writable array of plain-old-data messages
        // of exactly `bytes` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }
}

/// Calls of [`RawUffd::move_pages`] whose count the kernel reported short
/// (and which were corrected from the page tables).
static MOVE_UNDERCOUNTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many `UFFDIO_MOVE` calls of this process reported fewer pages than
/// they moved (see [`RawUffd::move_pages`]).
pub fn move_undercounts() -> u64 {
    MOVE_UNDERCOUNTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Bytes at the start of `[src, src+len)` that a short `UFFDIO_MOVE` moved
/// to `dst` without counting them: pages gone from `src` and, unless holes
/// were allowed (then a hole counts as moved, as the kernel counts it),
/// present at `dst`. Both ranges are the caller's (its contract with
/// `move_pages`), so nothing else changes them meanwhile. 0 if the page
/// tables cannot be read.
fn uncounted_moves(dst: usize, src: usize, len: u64, mode: u64) -> u64 {
    let n = (len / PAGE_SIZE) as usize;
    if n == 0 {
        return 0;
    }
    let (Ok(at_dst), Ok(at_src)) = (super::has_pages(dst, n), super::has_pages(src, n)) else {
        return 0;
    };
    let holes_ok = mode & MOVE_MODE_ALLOW_SRC_HOLES != 0;
    let moved = at_dst
        .iter()
        .zip(&at_src)
        .take_while(|&(&d, &s)| !s && (holes_ok || d))
        .count();
    moved as u64 * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // Values printed by a C program including <linux/userfaultfd.h>
        // (MOVE computed with the same _IOWR macro from the 6.8 struct).
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(UFFDIO_MOVE, 0xc028aa05);
        // _IOWR(0xAA, 0x08, struct uffdio_poison): 32 bytes.
        assert_eq!(UFFDIO_POISON, 0xc020aa08);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }

    #[test]
    fn open_with_move_feature() {
        let u = RawUffd::open(FEATURE_MOVE).expect("userfaultfd with UFFD_FEATURE_MOVE");
        let mut buf = [UffdMsg::default(); 4];
        assert_eq!(u.read_msgs(&mut buf).unwrap(), 0);
    }

    /// Two private anonymous mappings of `pages` pages.
    fn anon(pages: usize) -> usize {
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    /// Whether a write from another thread to `addr` raises a WP fault
    /// (answered by lifting the protection, so the writer finishes).
    fn write_faults_wp(u: &RawUffd, addr: usize) -> bool {
        let t = std::thread::spawn(move || {
            // SAFETY: a page of a live test mapping that nothing else touches.
            unsafe { (addr as *mut u8).add(8).write_volatile(7) };
        });
        let mut saw = false;
        let t0 = std::time::Instant::now();
        while !t.is_finished() && t0.elapsed() < std::time::Duration::from_secs(5) {
            let mut buf = [UffdMsg::default(); 1];
            if u.read_msgs(&mut buf).unwrap() == 1 {
                assert_eq!(buf[0].event, EVENT_PAGEFAULT);
                assert_ne!(buf[0].flags & PAGEFAULT_FLAG_WP, 0, "a WP fault");
                assert_eq!(buf[0].address as usize & !4095, addr);
                saw = true;
                u.write_protect(addr, 4096, false).unwrap();
            }
            std::thread::yield_now();
        }
        t.join().unwrap();
        saw
    }

    /// What clean-page tracking relies on: a page installed by
    /// `COPY_MODE_WP` raises a WP fault on its first write, and a page that
    /// `UFFDIO_MOVE` takes out of the guest is never left write-protected
    /// in the pool unnoticed (we lift the protection there ourselves).
    #[test]
    fn copy_with_wp_faults_on_the_first_write_only() {
        let u = RawUffd::open(FEATURE_MOVE).unwrap();
        let (guest, pool, src) = (anon(4), anon(4), anon(1));
        // SAFETY: both are fresh mappings of this test, whose faults the
        // test serves (`write_faults_wp`); nothing else uses them.
        unsafe {
            u.register(guest, 4 * 4096, REGISTER_MODE_MISSING | REGISTER_MODE_WP)
                .unwrap();
            u.register(pool, 4 * 4096, REGISTER_MODE_WP).unwrap();
        }
        // SAFETY: `src` is a live page of this test; `guest` is a hole.
        unsafe {
            (src as *mut u8).write_volatile(42);
            u.copy_mode(guest, src, 4096, COPY_MODE_WP).unwrap();
        }
        // SAFETY: the page was just installed; reads need no fault.
        assert_eq!(unsafe { (guest as *const u8).read_volatile() }, 42);
        assert!(write_faults_wp(&u, guest), "the first write faults");
        assert!(!write_faults_wp(&u, guest), "the second does not");
        // Protected again, then moved out to the pool.
        u.write_protect(guest, 4096, true).unwrap();
        // SAFETY: both pages belong to this test, no references into them.
        unsafe { u.move_pages(pool, guest, 4096, 0).unwrap() };
        let carried = write_faults_wp(&u, pool);
        eprintln!("UFFDIO_MOVE carries the WP bit: {carried}");
        // SAFETY: the moved page now lives at `pool`.
        assert_eq!(unsafe { (pool as *const u8).add(8).read_volatile() }, 7);
    }

    /// Pages of `[addr, addr + n pages)` that hold a page (pagemap).
    fn populated(addr: usize, n: usize) -> Vec<bool> {
        crate::sys::has_pages(addr, n).unwrap()
    }

    /// What every caller of `move_pages` builds on: the count it returns
    /// is the pages that moved. A second thread ages both ranges with
    /// `MADV_COLD` (clearing accessed bits, which changes PTEs under the
    /// kernel's feet and makes its PTE steps return `-EAGAIN`) while
    /// 64 pages go back and forth; after every call the pages at the
    /// destination are compared with the count, and the data at the end.
    /// Without the correction in `move_pages`, this kernel (6.18) reported
    /// 0 pages and `EEXIST` for a call that had moved all 64, a few times
    /// in 20 000.
    #[test]
    fn move_reports_every_page_it_moved_under_racing_pte_changes() {
        const N: usize = 64;
        const LEN: usize = N * 4096;
        let u = RawUffd::open(FEATURE_MOVE).unwrap();
        let (a, b, src) = (anon(N), anon(N), anon(N));
        // SAFETY: fresh mappings of this test; it touches a page of them
        // only where one is present (checked before the final reads).
        unsafe {
            u.register(a, LEN, REGISTER_MODE_MISSING).unwrap();
            u.register(b, LEN, REGISTER_MODE_MISSING).unwrap();
        }
        for p in 0..N {
            // SAFETY: a page of a test mapping nothing else uses.
            unsafe { ((src + p * 4096) as *mut u64).write_volatile(p as u64 + 1) };
        }
        // SAFETY: `a` is a registered hole of this test; `src` is readable.
        unsafe { u.copy(a, src, LEN as u64).unwrap() };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ager = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for r in [a, b] {
                        // SAFETY: MADV_COLD only ages pages of a test mapping.
                        unsafe { libc::madvise(r as *mut libc::c_void, LEN, libc::MADV_COLD) };
                    }
                }
            })
        };
        let (mut from, mut to) = (a, b);
        let (mut short, mut wrong) = (0, 0);
        for _ in 0..20_000 {
            let mut done = 0;
            while done < LEN {
                // SAFETY: both ranges belong to this test; nothing reads them.
                let r = unsafe { u.move_pages(to + done, from + done, (LEN - done) as u64, 0) };
                let Err(p) = r else { break };
                short += 1;
                let reported = done / 4096 + p.done as usize / 4096;
                let arrived = populated(to, N).iter().take_while(|&&x| x).count();
                if arrived != reported {
                    wrong += 1;
                    eprintln!(
                        "reported {reported} pages moved, {arrived} arrived (errno {})",
                        p.errno
                    );
                }
                done = arrived * 4096;
            }
            assert!(populated(from, N).iter().all(|&x| !x), "everything left");
            std::mem::swap(&mut from, &mut to);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        ager.join().unwrap();
        eprintln!(
            "short calls {short}, miscounted {wrong}, corrected {}",
            move_undercounts()
        );
        assert_eq!(wrong, 0, "a count that is not what moved");
        // A hole would block the read below (no handler serves this fd).
        assert!(populated(from, N).iter().all(|&x| x), "every page arrived");
        for p in 0..N {
            // SAFETY: a populated page of a test mapping nothing else uses.
            let v = unsafe { ((from + p * 4096) as *const u64).read_volatile() };
            assert_eq!(v, p as u64 + 1, "page {p}");
        }
    }
}
