//! Plain anonymous guest RAM: the kernel serves every fault.
//!
//! This is the `--mem-backend anon` baseline that benchmarks compare against.

use crate::{GuestAddress, GuestMemoryBackend, HostAddr, RamRegion};
use std::io;

/// 2 MiB: the alignment of every guest RAM mapping, so THP can back it.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Errors from creating anonymous guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum AnonError {
    /// A region's size is zero or not a multiple of 4 KiB.
    #[error("guest RAM region at {guest_base:#x} has invalid size {size:#x}")]
    BadSize {
        /// Guest base of the offending region.
        guest_base: u64,
        /// Its size.
        size: u64,
    },
    /// mmap refused the reservation.
    #[error("cannot map {size} bytes of guest RAM")]
    Mmap {
        /// Bytes requested.
        size: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// One owned private anonymous mapping, 2 MiB aligned.
#[derive(Debug)]
pub struct AnonMapping {
    addr: usize,
    len: usize,
    // Start and length of the whole reservation, for munmap.
    reserve_addr: usize,
    reserve_len: usize,
}

impl AnonMapping {
    /// Map `len` bytes of private anonymous memory at a 2 MiB-aligned address,
    /// with `MAP_NORESERVE` and `MADV_HUGEPAGE`.
    ///
    /// # Errors
    /// [`AnonError::Mmap`] if the kernel refuses the mapping.
    pub fn new(len: u64) -> Result<Self, AnonError> {
        Self::with_offset(len, 0)
    }

    /// Like [`AnonMapping::new`], but starting `offset` bytes (a multiple of
    /// 4 KiB below 2 MiB) past the 2 MiB boundary.
    ///
    /// # Errors
    /// [`AnonError::Mmap`] if the kernel refuses the mapping, or (`EINVAL`)
    /// for an offset that is not a multiple of 4 KiB below 2 MiB.
    pub fn with_offset(len: u64, offset: u64) -> Result<Self, AnonError> {
        let refuse = |errno| AnonError::Mmap {
            size: len,
            source: io::Error::from_raw_os_error(errno),
        };
        if offset >= HUGE_PAGE_SIZE || !offset.is_multiple_of(4096) {
            return Err(refuse(libc::EINVAL));
        }
        let align = HUGE_PAGE_SIZE as usize;
        // Checked: a wrapped sum made a tiny mapping that `len` below (the
        // sum minus `offset`, wrapping back) then claimed to be huge.
        let len = len
            .checked_add(offset)
            .ok_or_else(|| refuse(libc::ENOMEM))?;
        let len_usize = usize::try_from(len).map_err(|_| refuse(libc::ENOMEM))?;
        let reserve_len = len_usize
            .checked_add(align)
            .ok_or_else(|| AnonError::Mmap {
                size: len,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            })?;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address touches
        // no existing memory; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(AnonError::Mmap {
                size: len,
                source: io::Error::last_os_error(),
            });
        }
        let reserve_addr = p as usize;
        let addr = ((reserve_addr + align - 1) & !(align - 1)) + offset as usize;
        let len_usize = len_usize - offset as usize;
        // SAFETY: [addr, addr+len) lies inside the reservation we own and have
        // not handed out; madvise only changes the THP policy of that range.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, len_usize, libc::MADV_HUGEPAGE);
        }
        Ok(AnonMapping {
            addr,
            len: len_usize,
            reserve_addr,
            reserve_len,
        })
    }

    /// Host address of the first byte.
    pub fn host_addr(&self) -> HostAddr {
        HostAddr(self.addr)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the reservation was created by mmap in `new`, is owned solely
        // by this value, and nothing borrows it once the owner drops it.
        unsafe {
            libc::munmap(self.reserve_addr as *mut libc::c_void, self.reserve_len);
        }
    }
}

/// Guest RAM as plain anonymous mappings, one per region.
#[derive(Debug)]
pub struct AnonBackend {
    regions: Vec<RamRegion>,
    _maps: Vec<AnonMapping>,
}

impl AnonBackend {
    /// Map one anonymous mapping per `(guest_base, size)` in `layout`.
    ///
    /// # Errors
    /// [`AnonError::BadSize`] for an empty or unaligned region,
    /// [`AnonError::Mmap`] if the host refuses the memory.
    pub fn new(layout: &[(GuestAddress, u64)]) -> Result<Self, AnonError> {
        let mut regions = Vec::with_capacity(layout.len());
        let mut maps = Vec::with_capacity(layout.len());
        for &(guest_base, size) in layout {
            if size == 0 || size % 4096 != 0 {
                return Err(AnonError::BadSize {
                    guest_base: guest_base.raw(),
                    size,
                });
            }
            let m = AnonMapping::new(size)?;
            regions.push(RamRegion {
                guest_base,
                host_addr: m.host_addr(),
                size,
            });
            maps.push(m);
        }
        Ok(AnonBackend {
            regions,
            _maps: maps,
        })
    }
}

impl GuestMemoryBackend for AnonBackend {
    fn regions(&self) -> &[RamRegion] {
        &self.regions
    }
    fn kind(&self) -> &'static str {
        "anon"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_huge_aligned_and_writable() {
        let b = AnonBackend::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let r = b.regions()[0];
        assert_eq!(r.host_addr.raw() % HUGE_PAGE_SIZE as usize, 0);
        // SAFETY: the region is a live 4 MiB mapping owned by `b`.
        let s = unsafe { std::slice::from_raw_parts_mut(r.host_addr.as_ptr(), r.size as usize) };
        s[0] = 1;
        s[s.len() - 1] = 2;
        assert_eq!(s[1], 0);
    }

    #[test]
    fn offsets_that_wrap_or_are_out_of_range_are_refused() {
        // len + offset overflows u64: once a 4 KiB mapping whose `len()`
        // said almost 2^64.
        assert!(AnonMapping::with_offset(!4095, 8192).is_err());
        assert!(AnonMapping::with_offset(4096, HUGE_PAGE_SIZE).is_err());
        assert!(AnonMapping::with_offset(4096, 100).is_err());
        let m = AnonMapping::with_offset(4096, 8192).unwrap();
        assert_eq!(
            (m.len(), m.host_addr().raw() % HUGE_PAGE_SIZE as usize),
            (4096, 8192)
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(
            AnonBackend::new(&[(GuestAddress(0), 0)]),
            Err(AnonError::BadSize { .. })
        ));
        assert!(matches!(
            AnonBackend::new(&[(GuestAddress(0), 4097)]),
            Err(AnonError::BadSize { .. })
        ));
    }
}
