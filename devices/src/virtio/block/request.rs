//! virtio-blk requests (virtio 1.x §5.2.6): a 16-byte readable header
//! `{type: le32, reserved: le32, sector: le64}`, data buffers, and a
//! 1-byte writable status at the end.
//!
//! Framing: the header must start the first buffer and the status is the
//! last byte of the last buffer; the data are the buffers in between. That
//! is the layout Linux (and every driver we know) sends; a driver that
//! merged data into the header or status buffer gets an error status, never
//! a misread.

use crate::virtio::queue::{Buffer, Chain};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Bytes per sector, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header.
pub const HEADER_LEN: u32 = 16;
/// Length of a GET_ID answer.
pub const ID_LEN: usize = 20;
/// The largest data buffer the device offers to take (`size_max`, with
/// `VIRTIO_BLK_F_SIZE_MAX`). Linux makes it its largest segment, and
/// Linux's default request is about a MiB in all.
pub const SIZE_MAX: u32 = 1 << 20;
/// The most data one read or write may carry: `seg_max` buffers of
/// `size_max` each, which a driver that keeps to both never exceeds.
/// Longer requests are refused, so that one request cannot keep the event
/// loop (shared by every device of every VM) moving data for minutes: a
/// chain can name the same guest memory in each of its buffers, gigabytes
/// each, so without a limit a small guest's request could move hundreds of
/// GiB. This also keeps the length a read reports in the used ring (32
/// bits) exact.
pub const MAX_DATA_LEN: u64 = (super::QUEUE_SIZE as u64 - 2) * SIZE_MAX as u64;

/// Request types (virtio_blk.h `VIRTIO_BLK_T_*`).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values (`VIRTIO_BLK_S_*`).
pub const S_OK: u8 = 0;
/// I/O error, or a request the device refuses.
pub const S_IOERR: u8 = 1;
/// Unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Anything else (answered with UNSUPP).
    Unsupported(u32),
}

/// A request whose layout has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Type.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data buffers (all writable for In and GetId, readable for Out).
    pub data: Vec<Buffer>,
    /// Where the status byte goes.
    pub status: Buffer,
}

/// How a request can be malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The first buffer is shorter than the 16-byte header or writable.
    #[error("request header is not a readable buffer of at least 16 bytes")]
    BadHeader,
    /// The last buffer is not a writable buffer for the status byte.
    #[error("request has no writable status byte at its end")]
    NoStatus,
    /// A data buffer has the wrong direction for the request type.
    #[error("{kind:?} request has a data buffer of the wrong direction")]
    WrongDirection {
        /// The request type.
        kind: RequestKind,
    },
    /// A read or write whose length is not whole sectors.
    #[error("{kind:?} request of {len} bytes is not a multiple of 512")]
    PartialSector {
        /// The request type.
        kind: RequestKind,
        /// Data length.
        len: u64,
    },
    /// A read or write longer than the limits the device offers allow
    /// ([`MAX_DATA_LEN`]).
    #[error(
        "{kind:?} request of {len} bytes is longer than the {max} bytes seg_max and size_max allow"
    )]
    TooLong {
        /// The request type.
        kind: RequestKind,
        /// Data length.
        len: u64,
        /// The most allowed.
        max: u64,
    },
    /// A read or write past the end of the disk.
    #[error("{kind:?} request at sector {sector} for {len} bytes runs past the disk's {nsectors} sectors")]
    OutOfDisk {
        /// The request type.
        kind: RequestKind,
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk size in sectors.
        nsectors: u64,
    },
}

impl Request {
    /// Check the layout of `chain` as a block request against a disk of
    /// `nsectors` sectors.
    ///
    /// # Errors
    /// [`RequestError`]. If the chain ends in a writable byte, the caller
    /// can still report the error there ([`status_buffer`]).
    pub fn parse(
        chain: &Chain,
        mem: &GuestMemoryMmap,
        nsectors: u64,
    ) -> Result<Request, RequestError> {
        let bufs = &chain.buffers;
        let header = bufs.first().ok_or(RequestError::BadHeader)?;
        if header.writable || header.len < HEADER_LEN {
            return Err(RequestError::BadHeader);
        }
        let status = status_buffer(chain).ok_or(RequestError::NoStatus)?;
        if bufs.len() < 2 {
            return Err(RequestError::NoStatus);
        }
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, header.addr)
            .map_err(|_| RequestError::BadHeader)?;
        let kind = match u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes")) {
            T_IN => RequestKind::In,
            T_OUT => RequestKind::Out,
            T_FLUSH => RequestKind::Flush,
            T_GET_ID => RequestKind::GetId,
            t => RequestKind::Unsupported(t),
        };
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        // The chain is one byte stream (the device may assume no layout):
        // the header's first 16 bytes, the status's last byte, and the data
        // between them, also where it shares a buffer with either.
        let mut data = Vec::with_capacity(bufs.len());
        if header.len > HEADER_LEN {
            data.push(Buffer {
                addr: header.addr.unchecked_add_len(u64::from(HEADER_LEN)),
                len: header.len - HEADER_LEN,
                writable: false,
            });
        }
        data.extend_from_slice(&bufs[1..bufs.len() - 1]);
        let last = bufs[bufs.len() - 1];
        if last.len > 1 {
            data.push(Buffer {
                len: last.len - 1,
                ..last
            });
        }
        let want_writable = match kind {
            RequestKind::In | RequestKind::GetId => Some(true),
            RequestKind::Out => Some(false),
            RequestKind::Flush | RequestKind::Unsupported(_) => None,
        };
        if let Some(w) = want_writable {
            if data.iter().any(|b| b.writable != w) {
                return Err(RequestError::WrongDirection { kind });
            }
        }
        if matches!(kind, RequestKind::In | RequestKind::Out) {
            let len: u64 = data.iter().map(|b| u64::from(b.len)).sum();
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::PartialSector { kind, len });
            }
            if len > MAX_DATA_LEN {
                return Err(RequestError::TooLong {
                    kind,
                    len,
                    max: MAX_DATA_LEN,
                });
            }
            let end = sector.checked_add(len / SECTOR_SIZE);
            if end.is_none_or(|e| e > nsectors) {
                return Err(RequestError::OutOfDisk {
                    kind,
                    sector,
                    len,
                    nsectors,
                });
            }
        }
        Ok(Request {
            kind,
            sector,
            data,
            status,
        })
    }

    /// Total data length in bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// The status byte of `chain`: the first byte of its last buffer, if that
/// buffer is writable. (The header's 16 bytes are laid out before it.)
pub fn status_buffer(chain: &Chain) -> Option<Buffer> {
    let last = chain.buffers.last()?;
    if !last.writable || last.len == 0 || chain.buffers.len() < 2 {
        return None;
    }
    // The status is the last byte of the last buffer (Linux sends a 1-byte
    // buffer; a longer one is legal, its other bytes are data).
    Some(Buffer {
        addr: last.addr.unchecked_add_len(u64::from(last.len) - 1),
        len: 1,
        writable: true,
    })
}

/// `GuestAddress + len` without vm-memory's trait import noise.
trait AddLen {
    fn unchecked_add_len(self, n: u64) -> Self;
}

impl AddLen for vm_memory::GuestAddress {
    fn unchecked_add_len(self, n: u64) -> Self {
        vm_memory::GuestAddress(self.0 + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::memory;
    use vm_memory::GuestAddress;

    fn buf(addr: u64, len: u32, writable: bool) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn chain(mem: &GuestMemoryMmap, kind: u32, sector: u64, bufs: Vec<Buffer>) -> Chain {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, bufs[0].addr).unwrap();
        Chain {
            head: 0,
            buffers: bufs,
        }
    }

    #[test]
    fn read_write_flush_getid_parse() {
        let m = memory();
        let hdr = buf(0x10000, 16, false);
        let st = buf(0x13000, 1, true);
        let r = Request::parse(
            &chain(&m, T_IN, 8, vec![hdr, buf(0x11000, 4096, true), st]),
            &m,
            100,
        )
        .unwrap();
        assert_eq!((r.kind, r.sector, r.data_len()), (RequestKind::In, 8, 4096));
        assert_eq!(r.status, st);
        let r = Request::parse(
            &chain(&m, T_OUT, 0, vec![hdr, buf(0x11000, 512, false), st]),
            &m,
            100,
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Out);
        let r = Request::parse(&chain(&m, T_FLUSH, 0, vec![hdr, st]), &m, 100).unwrap();
        assert_eq!((r.kind, r.data.len()), (RequestKind::Flush, 0));
        let r = Request::parse(
            &chain(&m, T_GET_ID, 0, vec![hdr, buf(0x11000, 20, true), st]),
            &m,
            100,
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::GetId);
        let r = Request::parse(&chain(&m, 99, 0, vec![hdr, st]), &m, 100).unwrap();
        assert_eq!(r.kind, RequestKind::Unsupported(99));
    }

    #[test]
    fn a_status_in_a_longer_buffer_is_its_last_byte() {
        let m = memory();
        let c = chain(
            &m,
            T_IN,
            0,
            vec![buf(0x10000, 16, false), buf(0x11000, 513, true)],
        );
        assert_eq!(status_buffer(&c), Some(buf(0x11200, 1, true)));
        // The rest of the status buffer is data (the device may assume no
        // layout): a 512-byte read into its first 512 bytes.
        let r = Request::parse(&c, &m, 10).unwrap();
        assert_eq!(r.data, vec![buf(0x11000, 512, true)]);
    }

    #[test]
    fn hostile_layouts_are_refused() {
        let m = memory();
        let hdr = buf(0x10000, 16, false);
        let st = buf(0x13000, 1, true);
        let cases: Vec<(Vec<Buffer>, u32, u64, RequestError)> = vec![
            // Too-short header.
            (
                vec![buf(0x10000, 8, false), st],
                T_IN,
                0,
                RequestError::BadHeader,
            ),
            // Writable header.
            (
                vec![buf(0x10000, 16, true), st],
                T_IN,
                0,
                RequestError::BadHeader,
            ),
            // No status: last buffer readable, or the header alone.
            (
                vec![hdr, buf(0x11000, 512, false)],
                T_OUT,
                0,
                RequestError::NoStatus,
            ),
            (vec![hdr], T_FLUSH, 0, RequestError::NoStatus),
            // A read into a readable buffer.
            (
                vec![hdr, buf(0x11000, 512, false), st],
                T_IN,
                0,
                RequestError::WrongDirection {
                    kind: RequestKind::In,
                },
            ),
            // A write from a writable buffer.
            (
                vec![hdr, buf(0x11000, 512, true), st],
                T_OUT,
                0,
                RequestError::WrongDirection {
                    kind: RequestKind::Out,
                },
            ),
            // Partial sector.
            (
                vec![hdr, buf(0x11000, 100, true), st],
                T_IN,
                0,
                RequestError::PartialSector {
                    kind: RequestKind::In,
                    len: 100,
                },
            ),
            // Past the end, and a sector number that overflows.
            (
                vec![hdr, buf(0x11000, 1024, true), st],
                T_IN,
                99,
                RequestError::OutOfDisk {
                    kind: RequestKind::In,
                    sector: 99,
                    len: 1024,
                    nsectors: 100,
                },
            ),
            (
                vec![hdr, buf(0x11000, 512, false), st],
                T_OUT,
                u64::MAX,
                RequestError::OutOfDisk {
                    kind: RequestKind::Out,
                    sector: u64::MAX,
                    len: 512,
                    nsectors: 100,
                },
            ),
        ];
        for (bufs, kind, sector, want) in cases {
            let c = chain(&m, kind, sector, bufs.clone());
            assert_eq!(Request::parse(&c, &m, 100), Err(want), "{bufs:?}");
        }
    }
    /// A chain may name the same guest memory in every buffer, so a small
    /// guest's request could ask to move far more than its RAM. Up to
    /// `seg_max` buffers of `size_max` each are served; more is refused
    /// before anything moves.
    #[test]
    fn requests_longer_than_seg_max_buffers_of_size_max_are_refused() {
        let m = memory();
        let hdr = buf(0x10000, 16, false);
        let st = buf(0x13000, 1, true);
        let nsectors = 1 << 40;
        let seg_max = u32::from(super::super::QUEUE_SIZE - 2);
        for (kind, w, k) in [
            (T_IN, true, RequestKind::In),
            (T_OUT, false, RequestKind::Out),
        ] {
            let mut bufs = vec![hdr];
            bufs.extend((0..seg_max).map(|_| buf(0x20000, SIZE_MAX, w)));
            bufs.push(st);
            let r = Request::parse(&chain(&m, kind, 0, bufs.clone()), &m, nsectors).unwrap();
            assert_eq!(r.data_len(), MAX_DATA_LEN);
            // One sector more, in the last buffer or as a buffer of its own.
            let last = bufs.len() - 2;
            bufs[last].len += 512;
            let want = Err(RequestError::TooLong {
                kind: k,
                len: MAX_DATA_LEN + 512,
                max: MAX_DATA_LEN,
            });
            assert_eq!(
                Request::parse(&chain(&m, kind, 0, bufs.clone()), &m, nsectors),
                want
            );
            bufs[last].len -= 512;
            bufs.insert(last, buf(0x20000, 512, w));
            assert_eq!(
                Request::parse(&chain(&m, kind, 0, bufs), &m, nsectors),
                want
            );
            // Gigabytes in few buffers.
            let huge = vec![hdr, buf(0x20000, !511, w), st];
            assert!(matches!(
                Request::parse(&chain(&m, kind, 0, huge), &m, nsectors),
                Err(RequestError::TooLong { .. })
            ));
        }
    }
}
