//! Raw system calls, behind small safe or `unsafe fn` wrappers.
//!
//! Everything that passes a raw address to the kernel lives here, so the
//! rest of the crate reads in terms of pool offsets and page indices.

pub mod sigbus;
pub mod userfaultfd;

use std::io;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault in writable pages.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `MADV_COLLAPSE` (Linux 6.1): synchronously collapse a range into THPs.
const MADV_COLLAPSE: libc::c_int = 25;

/// `madvise(2)` on `[addr, addr+len)`.
///
/// # Safety
/// If `advice` changes what the range reads (`MADV_DONTNEED`), the caller
/// must own the range as [`dontneed`] requires. Advice that keeps contents
/// (`MADV_POPULATE_WRITE`, `MADV_COLLAPSE`) needs nothing: an unmapped or
/// unsuitable range fails with an errno.
unsafe fn madvise(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise takes no pointer it dereferences; what the advice does
    // to the range's contents is the caller's contract.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drop the pages of `[addr, addr+len)`; private anon memory reads as zero
/// (or faults to userfaultfd if registered MISSING) afterwards.
///
/// # Errors
/// The errno of `madvise(MADV_DONTNEED)`.
///
/// # Safety
/// The range's contents change under anything that points into it, and
/// the kernel drops whatever memory is mapped there (a range in the heap
/// does not fail, it is zeroed). So the range must be a private anonymous
/// mapping this crate owns (the pool or a guest region), that the caller
/// owns for the call (the folio lock or page-table lock that covers it,
/// or the last reference), and that no Rust reference points into.
pub unsafe fn dontneed(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's contract.
    unsafe { madvise(addr, len, libc::MADV_DONTNEED) }
}

/// `MADV_DONTNEED` on many ranges of our own address space in one
/// `process_madvise(2)` per 1024 ranges, so that the kernel batches the
/// TLB flushes (one `madvise` each would flush each). Falls back to one
/// `madvise` per range where `process_madvise` is refused.
///
/// # Errors
/// The errno of the fallback `madvise`.
///
/// # Safety
/// As [`dontneed`], for every range.
pub unsafe fn dontneed_many(ranges: &[(usize, usize)]) -> io::Result<()> {
    // Adjacent ranges become one: the kernel pays a VMA lookup and a page
    // walk per range.
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(sorted.len());
    for (a, l) in sorted {
        match merged.last_mut() {
            Some(m) if m.0 + m.1 == a => m.1 += l,
            _ => merged.push((a, l)),
        }
    }
    let ranges = &merged;
    let pidfd = self_pidfd();
    for chunk in ranges.chunks(1024) {
        let iov: Vec<libc::iovec> = chunk
            .iter()
            .map(|&(a, l)| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        let done = if pidfd >= 0 {
            // SAFETY: `iov` describes the caller's ranges, which it owns
            // with no reference into them (our contract); MADV_DONTNEED
            // only drops their pages. The kernel reads `iov`, a live array
            // of `iov.len()` entries, for the call only.
            unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd,
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            }
        } else {
            -1
        };
        let total: usize = chunk.iter().map(|r| r.1).sum();
        if done < 0 || done as usize != total {
            for &(a, l) in chunk {
                // SAFETY: one of the caller's ranges (our contract).
                unsafe { dontneed(a, l)? };
            }
        }
    }
    Ok(())
}

/// A pidfd of this process for `process_madvise`, opened once per process
/// (a `pidfd_open` and `close` per call were a tenth of the time of
/// compaction's zaps), or -1 if the kernel refuses. Keyed by pid: a forked child must not
/// advise its parent's memory, so it opens its own.
fn self_pidfd() -> i32 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    static CACHE: std::sync::Mutex<Option<(i32, OwnedFd)>> = std::sync::Mutex::new(None);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    match &*cache {
        Some((p, fd)) if *p == pid => fd.as_raw_fd(),
        _ => {
            // SAFETY: pidfd_open on our own pid has no memory effects; the
            // result is checked before use.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
            if fd < 0 {
                return -1;
            }
            // SAFETY: `fd` was just opened and is owned by nothing else; the
            // `OwnedFd` closes it (a replaced one, after a fork, closes the
            // child's inherited copy of the parent's).
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            *cache = Some((pid, owned));
            fd
        }
    }
}

/// Fault in every page of `[addr, addr+len)` writable, without touching it
/// from user space. Populated pages are left as they are.
///
/// # Errors
/// The errno of `madvise(MADV_POPULATE_WRITE)`.
pub fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: POPULATE_WRITE only faults pages in (breaking COW keeps the
    // data); populated pages keep their contents.
    unsafe { madvise(addr, len, MADV_POPULATE_WRITE) }
}

/// Collapse `[addr, addr+len)` into PMD-mapped THPs (a no-op if it already is).
///
/// # Errors
/// The errno of `madvise(MADV_COLLAPSE)`.
pub fn collapse(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_COLLAPSE copies pages into a THP and keeps their
    // contents (holes read as zero before and after).
    unsafe { madvise(addr, len, MADV_COLLAPSE) }
}

/// Whether the page at `addr` (page-aligned) is resident (`mincore(2)`).
///
/// # Errors
/// The errno of `mincore(2)`.
pub fn resident(addr: usize) -> io::Result<bool> {
    let mut vec = 0u8;
    // SAFETY: mincore reads no user memory and writes one byte, for the one
    // page asked, into `vec`, which lives across the call.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, 4096, &mut vec) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec & 1 != 0)
}

/// The `/proc/self/pagemap` entry of the page at `addr`: bit 63 present,
/// 62 swapped, 57 uffd-wp, 56 exclusively mapped.
///
/// # Errors
/// Opening or reading the pagemap.
pub fn pagemap(addr: usize) -> io::Result<u64> {
    Ok(pagemap_range(addr, 1)?[0])
}

/// The `/proc/self/pagemap` entries of the `n` pages from `addr`, by one
/// read.
///
/// # Errors
/// Opening or reading the pagemap.
pub fn pagemap_range(addr: usize, n: usize) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    // Opened once per process: a fault handler asks on every raced fault.
    // Keyed by pid, as a forked child must read its own page table.
    static CACHE: std::sync::Mutex<Option<(i32, Arc<std::fs::File>)>> = std::sync::Mutex::new(None);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let f = {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        match &*cache {
            Some((p, f)) if *p == pid => f.clone(),
            _ => {
                let f = Arc::new(std::fs::File::open("/proc/self/pagemap")?);
                *cache = Some((pid, f.clone()));
                f
            }
        }
    };
    let mut b = vec![0u8; n * 8];
    f.read_exact_at(&mut b, (addr as u64 / crate::types::PAGE_SIZE) * 8)?;
    Ok(b.chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .collect())
}

/// The `pagemap` bits that say a page holds data: mapped, or in host swap.
const PM_HAS_PAGE: u64 = 3 << 62;

/// Whether the page at `addr` holds data in this process: mapped, or in
/// host swap (`pagemap` bits 63 and 62). A page the host swapped out is not
/// resident for `mincore`, yet its data is there.
///
/// # Errors
/// Reading the pagemap.
pub fn has_page(addr: usize) -> io::Result<bool> {
    Ok(has_pages(addr, 1)?[0])
}

/// [`has_page`] for the `n` pages from `addr`, by one read of the pagemap.
///
/// # Errors
/// Reading the pagemap.
pub fn has_pages(addr: usize, n: usize) -> io::Result<Vec<bool>> {
    Ok(pagemap_range(addr, n)?
        .into_iter()
        .map(|e| e & PM_HAS_PAGE != 0)
        .collect())
}

/// An eventfd used to wake poll loops at shutdown.
#[derive(Debug)]
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    ///
    /// # Errors
    /// The errno of `eventfd(2)`.
    pub fn new() -> io::Result<EventFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(EventFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Make the eventfd readable (forever, since nobody reads it).
    pub fn signal(&self) {
        use std::os::fd::AsRawFd;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an fd we own.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// The raw fd, for poll.
    pub fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

/// Wait until `a` or `b` is readable, or `timeout_ms` passes.
/// Returns `(a_ready, b_ready)`.
pub fn poll2(a: std::os::fd::RawFd, b: std::os::fd::RawFd, timeout_ms: i32) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfd structs and we pass its length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if rc <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// An epoll instance of one thread that waits for one of two fds, with the
/// first added exclusively (`EPOLLEXCLUSIVE`): a wake-up on it (a new
/// userfaultfd event) wakes one idle waiter, not every thread polling it.
#[derive(Debug)]
pub struct ExclusiveWait(std::os::fd::OwnedFd);

impl ExclusiveWait {
    /// Wait for `work` (exclusively: one waiter woken per event) or `stop`
    /// (every waiter sees it).
    ///
    /// # Errors
    /// The errno of `epoll_create1(2)` or `epoll_ctl(2)`.
    pub fn new(work: std::os::fd::RawFd, stop: std::os::fd::RawFd) -> io::Result<ExclusiveWait> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: epoll_create1 takes only flags; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        let ep = ExclusiveWait(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        for (raw, events, token) in [
            (work, libc::EPOLLIN | libc::EPOLLEXCLUSIVE, 0u64),
            (stop, libc::EPOLLIN, 1u64),
        ] {
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: token,
            };
            // SAFETY: `ev` is a live epoll_event the kernel only reads; the
            // epoll fd is ours and `raw` is a caller-owned open fd.
            let rc =
                unsafe { libc::epoll_ctl(ep.0.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, &mut ev) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(ep)
    }

    /// Wait up to `timeout_ms`. Returns `(work_ready, stop_ready)`.
    pub fn wait(&self, timeout_ms: i32) -> (bool, bool) {
        use std::os::fd::AsRawFd;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: `evs` is a live, writable array of two epoll_event structs
        // and we pass its length.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 2, timeout_ms) };
        let got = &evs[..n.max(0) as usize];
        (
            got.iter().any(|e| e.u64 == 0),
            got.iter().any(|e| e.u64 == 1),
        )
    }
}
