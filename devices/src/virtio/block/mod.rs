//! virtio-blk over a raw image file: read, write, flush and get-id, one
//! request queue. Analogue of Linux `drivers/block/virtio_blk.c`, device side.
//!
//! Requests run on the VM's device I/O thread, the VMM's event loop for
//! that VM's devices (the queue's notification is a KVM ioeventfd). Data
//! moves with `pread`/`pwrite` straight between the image and guest memory,
//! through vm-memory's bounds-checked slices, with each data buffer pinned
//! while it moves ([`RamControl::pin`]), in pieces of at most
//! [`PIN_CHUNK`].
//!
//! A pin that finds no memory (the budget exhausted, reclaim not keeping
//! up) does not fail the request: it goes back to the queue and the queue
//! is [`QueueState::Deferred`], to be retried by the VMM a little later,
//! as a guest fault waits for memory. The event loop is not held while it
//! waits, and the guest sees a slow request, not an I/O error. Retrying
//! repeats the transfer of the buffers already done, which is harmless: a
//! driver leaves a request's buffers alone until it completes.

pub mod bench;
#[cfg(test)]
mod fuzz;
pub mod request;

use self::request::{status_buffer, Request, RequestKind, ID_LEN, SECTOR_SIZE, S_IOERR, S_OK};
use super::queue::{drain_queue, Chain, ChainError, Served};
use super::{
    ActiveQueues, QueueState, RamControl, RamError, VirtioDevice, WarnLimit, VIRTIO_F_VERSION_1,
};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Queue size; `seg_max` is two less (header and status).
pub const QUEUE_SIZE: u16 = 256;

/// The most of a buffer pinned at once: a transfer pins and moves each
/// buffer piece by piece, every piece inside one 2 MiB-aligned guest
/// range, so that a request never needs more guest memory resident and
/// pinned at once than that, however large its buffers.
pub const PIN_CHUNK: u64 = 2 << 20;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;

/// Errors opening a drive's image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened (missing, no permission).
    #[error("cannot open drive image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The image is smaller than one sector.
    #[error("drive image {path} is {size} bytes, smaller than one 512-byte sector")]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The image is not a regular file or block device.
    #[error("drive image {path} is not a regular file or block device")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
}

/// A raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    nsectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

impl DiskImage {
    /// Open `path` (read-only if `read_only`); `id` is what GET_ID returns
    /// (truncated to 20 bytes).
    ///
    /// # Errors
    /// [`DiskError`].
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, DiskError> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO for reading would wait for a writer
        // (for ever, on the thread that builds the VM); it is refused
        // below instead, and a regular file's or block device's reads
        // and writes never wait on the flag, which is cleared all the same.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor `file` owns and keeps open;
        // F_GETFL and F_SETFL take and change only its status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(DiskError::Open {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(DiskError::NotAFile {
                    path: path.to_path_buf(),
                });
            }
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|source| DiskError::Open {
                    path: path.to_path_buf(),
                    source,
                })?
        };
        if size < SECTOR_SIZE {
            return Err(DiskError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            eprintln!(
                "foliovm: warning: drive image {} is {size} bytes, not a multiple of 512; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let mut idb = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(DiskImage {
            file,
            nsectors: size / SECTOR_SIZE,
            read_only,
            id: idb,
        })
    }

    /// Size in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.nsectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Counters of one block device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    /// Requests completed with OK.
    pub ok: u64,
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub write_bytes: u64,
    /// Requests completed with IOERR or UNSUPP (incl. malformed ones).
    pub errors: u64,
    /// Malformed chains or requests.
    pub malformed: u64,
    /// Times a request was put back to wait for guest memory.
    pub deferred: u64,
}

/// [`BlockCounters`] that other threads read without the device's lock
/// (`GET /stats` must not wait for a request in progress on the VM's
/// device I/O thread). Each counter is updated on its own: a snapshot may
/// show a request's bytes before its `ok`.
#[derive(Debug, Default)]
pub struct SharedBlockCounters {
    ok: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    malformed: AtomicU64,
    deferred: AtomicU64,
}

impl SharedBlockCounters {
    /// The counters now.
    pub fn snapshot(&self) -> BlockCounters {
        let l = |c: &AtomicU64| c.load(Relaxed);
        BlockCounters {
            ok: l(&self.ok),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            errors: l(&self.errors),
            malformed: l(&self.malformed),
            deferred: l(&self.deferred),
        }
    }
}

/// Add `n` to a counter.
fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// A virtio-blk device.
pub struct Block {
    disk: DiskImage,
    ram: Arc<dyn RamControl>,
    config: [u8; 24],
    active: Option<ActiveQueues>,
    counters: Arc<SharedBlockCounters>,
    warn: WarnLimit,
    /// Since when the request at the head of the queue waits for guest
    /// memory (reported once when it starts and once when it ends).
    memory_wait: Option<std::time::Instant>,
    name: String,
}

impl Block {
    /// A block device over `disk`; `name` labels warnings.
    pub fn new(disk: DiskImage, ram: Arc<dyn RamControl>, name: &str) -> Self {
        // struct virtio_blk_config: capacity le64, size_max le32,
        // seg_max le32, geometry (4 bytes), blk_size le32.
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&disk.nsectors.to_le_bytes());
        config[8..12].copy_from_slice(&request::SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block {
            disk,
            ram,
            config,
            active: None,
            counters: Arc::default(),
            warn: WarnLimit::default(),
            memory_wait: None,
            name: name.to_string(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> BlockCounters {
        self.counters.snapshot()
    }

    /// The counters, to read later without this device's lock.
    pub fn shared_counters(&self) -> Arc<SharedBlockCounters> {
        self.counters.clone()
    }

    /// Handle one chain; returns (head, used length).
    fn handle(&mut self, chain: Result<Chain, (u16, ChainError)>, mem: &GuestMemoryMmap) -> Served {
        let chain = match chain {
            Ok(c) => c,
            Err((head, e)) => {
                // Nothing in a malformed chain can be trusted, not even
                // where its status byte would go.
                add(&self.counters.malformed, 1);
                add(&self.counters.errors, 1);
                let name = &self.name;
                self.warn.warn(|| format!("{name}: malformed request: {e}"));
                return Served::Used(head, 0);
            }
        };
        let (status, written) = match Request::parse(&chain, mem, self.disk.nsectors) {
            Ok(req) => match self.execute(&req, mem) {
                Some(done) => {
                    if let Some(t) = self.memory_wait.take() {
                        eprintln!(
                            "foliovm: {}: request at sector {} served after waiting {:.1} s for guest memory",
                            self.name,
                            req.sector,
                            t.elapsed().as_secs_f64()
                        );
                    }
                    done
                }
                None => return Served::Deferred,
            },
            Err(e) => {
                add(&self.counters.malformed, 1);
                let name = &self.name;
                self.warn.warn(|| format!("{name}: bad request: {e}"));
                (S_IOERR, 0)
            }
        };
        if status == S_OK {
            add(&self.counters.ok, 1);
        } else {
            add(&self.counters.errors, 1);
        }
        match status_buffer(&chain) {
            Some(st) if mem.write_obj(status, st.addr).is_ok() => {
                Served::Used(chain.head, written + 1)
            }
            _ => Served::Used(chain.head, 0),
        }
    }

    /// Run a checked request; returns (status, bytes written to the guest
    /// before the status), or `None` when it must wait for guest memory.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Option<(u8, u32)> {
        Some(match req.kind {
            RequestKind::In => match self.transfer(req, mem, Direction::Read) {
                Ok(n) => {
                    add(&self.counters.read_bytes, n);
                    (S_OK, n as u32)
                }
                Err(e) => self.transfer_error("read", req, e)?,
            },
            RequestKind::Out if self.disk.read_only => {
                let name = &self.name;
                self.warn.warn(|| {
                    format!(
                        "{name}: guest wrote to a read-only drive (sector {})",
                        req.sector
                    )
                });
                (S_IOERR, 0)
            }
            RequestKind::Out => match self.transfer(req, mem, Direction::Write) {
                Ok(n) => {
                    add(&self.counters.write_bytes, n);
                    (S_OK, 0)
                }
                Err(e) => self.transfer_error("write", req, e)?,
            },
            RequestKind::Flush => match self.disk.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => self.io_error("flush", req, &e),
            },
            RequestKind::GetId => {
                if req.data.is_empty() {
                    return Some((S_IOERR, 0));
                }
                // The id goes into the data as one byte stream, across
                // buffers, as far as they and the id's 20 bytes go.
                let mut n = 0;
                for b in &req.data {
                    let take = (b.len as usize).min(ID_LEN - n);
                    if take == 0 {
                        continue;
                    }
                    if mem.write_slice(&self.disk.id[n..n + take], b.addr).is_err() {
                        return Some((S_IOERR, 0));
                    }
                    n += take;
                }
                (S_OK, n as u32)
            }
            RequestKind::Unsupported(_) => (request::S_UNSUPP, 0),
        })
    }

    /// A transfer stopped by `e`: the request fails, or (`None`) waits for
    /// guest memory.
    fn transfer_error(&mut self, op: &str, req: &Request, e: TransferError) -> Option<(u8, u32)> {
        match e {
            TransferError::Io(e) => Some(self.io_error(op, req, &e)),
            TransferError::NoMemory(e) => {
                add(&self.counters.deferred, 1);
                if self.memory_wait.is_none() {
                    self.memory_wait = Some(std::time::Instant::now());
                    eprintln!(
                        "foliovm: warning: {}: {op} at sector {} waits for guest memory ({e}); retried until memory comes",
                        self.name, req.sector
                    );
                }
                None
            }
        }
    }

    fn io_error(&mut self, op: &str, req: &Request, e: &std::io::Error) -> (u8, u32) {
        let name = &self.name;
        self.warn
            .warn(|| format!("{name}: {op} at sector {} failed: {e}", req.sector));
        (S_IOERR, 0)
    }

    /// Move the data of `req` between the image and guest memory.
    fn transfer(
        &mut self,
        req: &Request,
        mem: &GuestMemoryMmap,
        dir: Direction,
    ) -> Result<u64, TransferError> {
        let mut offset = req.sector * SECTOR_SIZE;
        for b in &req.data {
            let len = u64::from(b.len);
            let mut at = 0u64;
            while at < len {
                // The buffer is inside guest RAM (checked with its chain),
                // so this does not overflow.
                let gpa = b.addr.0 + at;
                let n = (PIN_CHUNK - gpa % PIN_CHUNK).min(len - at);
                self.transfer_piece(mem, gpa, n, offset + at, dir)?;
                at += n;
            }
            offset += len;
        }
        Ok(req.data_len())
    }

    /// Pin `[gpa, gpa + len)` and move it to or from the image at `offset`.
    fn transfer_piece(
        &self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
        offset: u64,
        dir: Direction,
    ) -> Result<(), TransferError> {
        let _pin = match self.ram.pin(gpa, len) {
            Ok(pin) => pin,
            Err(e @ RamError::NoMemory { .. }) => return Err(TransferError::NoMemory(e)),
            Err(e) => return Err(TransferError::Io(std::io::Error::other(e))),
        };
        let len = len as usize;
        let slice = mem
            .get_slice(vm_memory::GuestAddress(gpa), len)
            .map_err(|e| TransferError::Io(std::io::Error::other(e)))?;
        let ptr = slice.ptr_guard_mut();
        let mut done = 0usize;
        while done < len {
            let left = len - done;
            // SAFETY: [ptr, ptr + len) is a guest-memory slice that
            // vm-memory bounds-checked against one mapped region, kept
            // mapped by `mem` and pinned in place by `_pin`. Guest memory
            // is never borrowed as a Rust slice; the kernel copies into
            // or out of it, which is sound with concurrent vCPU access.
            let r = unsafe {
                let p = ptr.as_ptr().add(done).cast();
                let off = (offset + done as u64) as libc::off_t;
                match dir {
                    Direction::Read => libc::pread(self.disk.file.as_raw_fd(), p, left, off),
                    Direction::Write => libc::pwrite(self.disk.file.as_raw_fd(), p, left, off),
                }
            };
            match r {
                r if r > 0 => done += r as usize,
                0 => {
                    return Err(TransferError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "image shrank under the guest",
                    )))
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(TransferError::Io(e));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a transfer stopped.
enum TransferError {
    /// A buffer's pin found no memory: the request waits.
    NoMemory(RamError),
    /// Anything else: the request fails.
    Io(std::io::Error),
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << super::VIRTIO_RING_F_EVENT_IDX
            | 1 << F_SIZE_MAX
            | 1 << F_SEG_MAX
            | 1 << F_BLK_SIZE
            | 1 << F_FLUSH;
        if self.disk.read_only {
            f |= 1 << F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable (no CONFIG_WCE).
    }

    fn activate(&mut self, queues: ActiveQueues) {
        self.active = Some(queues);
    }

    fn reset(&mut self) {
        self.active = None;
        self.memory_wait = None;
    }

    fn set_memory(&mut self, mem: GuestMemoryMmap) {
        if let Some(a) = &mut self.active {
            a.mem = mem;
        }
    }

    fn process_queue(&mut self, index: usize) -> QueueState {
        let Some(mut active) = self.active.take() else {
            return QueueState::Drained;
        };
        let mut state = QueueState::Drained;
        if let Some(q) = active.queues.get_mut(index) {
            let mem = active.mem.clone();
            let drained = drain_queue(q, &mem, |c| {
                let served = self.handle(c, &mem);
                if served != Served::Deferred {
                    // The request that waited for memory (the first in
                    // the queue) was answered, served or not.
                    self.memory_wait = None;
                }
                served
            });
            if drained.notify {
                active.irq.signal(super::INT_USED_RING);
            }
            if !drained.deferred {
                // No request waits for memory now, also when the one that
                // waited was taken back by the driver (or its queue
                // broken): the next wait is a new one.
                self.memory_wait = None;
            }
            if let Some(idx) = drained.bad_avail_idx {
                add(&self.counters.malformed, 1);
                let name = &self.name;
                self.warn.warn(|| {
                    format!("{name}: driver's avail index {idx} is more than the queue size ahead; queue stopped until the driver resets the device")
                });
                state = QueueState::NeedsReset;
            } else if drained.deferred {
                state = QueueState::Deferred;
            } else if drained.more {
                state = QueueState::More;
            }
        }
        self.active = Some(active);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::{desc, memory, queue_with};
    use crate::virtio::{IrqLine, NoRamControl, QueueState, RamError};
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    pub(super) fn image(len: usize) -> (tempfile_lite::TempFile, PathBuf) {
        let t = tempfile_lite::TempFile::new();
        let mut f = File::create(&t.0).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        f.write_all(&data).unwrap();
        let p = t.0.clone();
        (t, p)
    }

    /// A tiny self-deleting temp file (no extra crate).
    pub(super) mod tempfile_lite {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "foliovm-blk-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    /// A FIFO is refused at once, read-only or not: opening one for
    /// reading waits for a writer, and the open runs where nothing may
    /// wait (the API's event loop at InstanceStart), with SIGTERM caught.
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let t = tempfile_lite::TempFile::new();
        let c = std::ffi::CString::new(t.0.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = t.0.clone();
        std::thread::spawn(move || {
            let r = [true, false].map(|ro| DiskImage::open(&path, ro, "f").map(|_| ()));
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("DiskImage::open of a FIFO waited for a writer");
        for e in r {
            let e = e.unwrap_err();
            assert!(matches!(e, DiskError::NotAFile { .. }), "{e}");
        }
    }

    struct Rig {
        dev: Block,
        mem: GuestMemoryMmap,
        irqs: Arc<AtomicU32>,
    }

    fn rig(path: &Path, ro: bool) -> Rig {
        let mem = memory();
        let disk = DiskImage::open(path, ro, "test-disk-id").unwrap();
        let irqs = Arc::new(AtomicU32::new(0));
        let dev = Block::new(disk, Arc::new(NoRamControl), "vda");
        Rig { dev, mem, irqs }
    }

    impl Rig {
        /// Submit one chain of `descs` and run the queue; returns the
        /// status byte and the used length.
        fn submit(
            &mut self,
            kind: u32,
            sector: u64,
            descs: &[virtio_queue::desc::RawDescriptor],
        ) -> (u8, u32) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let q = queue_with(&self.mem, 0, descs);
            let irqs = self.irqs.clone();
            self.dev.activate(ActiveQueues {
                queues: vec![q],
                mem: self.mem.clone(),
                irq: IrqLine::new(move || {
                    irqs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }),
                acked_features: 0,
            });
            self.dev.process_queue(0);
            let q = &self.dev.active.as_ref().unwrap().queues[0];
            assert_eq!(q.next_used(), 1, "the chain was completed");
            // used ring: flags u16, idx u16, then {id u32, len u32}.
            let used = q.used_ring();
            let len: u32 = self.mem.read_obj(GuestAddress(used + 8)).unwrap();
            let st: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            (st, len)
        }
    }

    fn rw(kind_w: bool, len: u32) -> Vec<virtio_queue::desc::RawDescriptor> {
        vec![
            desc(HDR, 16, N, 1),
            desc(DATA, len, N | if kind_w { 0 } else { W }, 2),
            desc(STATUS, 1, W, 0),
        ]
    }

    #[test]
    fn read_write_flush_and_get_id() {
        let (_t, p) = image(8 * 512);
        let mut r = rig(&p, false);
        // Read sectors 2..4: bytes are the sector number.
        assert_eq!(r.submit(0, 2, &rw(false, 1024)), (S_OK, 1025));
        let mut buf = [0u8; 1024];
        r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 2) && buf[512..].iter().all(|&b| b == 3));
        // Write sector 5 and read the file.
        r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(1, 5, &rw(true, 512)), (S_OK, 1));
        let f = std::fs::read(&p).unwrap();
        assert!(f[5 * 512..6 * 512].iter().all(|&b| b == 0xab));
        assert!(f[6 * 512..7 * 512].iter().all(|&b| b == 6));
        // Flush.
        assert_eq!(
            r.submit(4, 0, &[desc(HDR, 16, N, 1), desc(STATUS, 1, W, 0)]),
            (S_OK, 1)
        );
        // Get id.
        assert_eq!(r.submit(8, 0, &rw(false, 20)), (S_OK, 21));
        let mut id = [0u8; 12];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-disk-id");
        // Unsupported type.
        assert_eq!(
            r.submit(11, 0, &[desc(HDR, 16, N, 1), desc(STATUS, 1, W, 0)]),
            (request::S_UNSUPP, 1)
        );
        assert!(r.irqs.load(Ordering::SeqCst) >= 5);
        let c = r.dev.counters();
        assert_eq!((c.read_bytes, c.write_bytes, c.malformed), (1024, 512, 0));
    }

    /// The chain is a byte stream: data sharing a buffer with the header
    /// (a write) or with the status (a read) moves like any other. (It was
    /// dropped and the request answered OK.)
    #[test]
    fn data_sharing_a_buffer_with_the_header_or_the_status_is_moved() {
        let (_t, p) = image(4 * 512);
        let mut r = rig(&p, false);
        // Write sector 1 from the 512 bytes after the header.
        r.mem
            .write_slice(&[0xcd; 512], GuestAddress(HDR + 16))
            .unwrap();
        let merged_out = [desc(HDR, 16 + 512, N, 1), desc(STATUS, 1, W, 0)];
        assert_eq!(r.submit(1, 1, &merged_out), (S_OK, 1));
        assert!(std::fs::read(&p).unwrap()[512..1024]
            .iter()
            .all(|&b| b == 0xcd));
        // Read sector 2 into a buffer whose last byte is the status.
        let merged_in = [desc(HDR, 16, N, 1), desc(DATA, 512 + 1, W, 0)];
        let (_, len) = r.submit(0, 2, &merged_in);
        assert_eq!(len, 513);
        let st: u8 = r.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
        assert_eq!(st, S_OK);
        let mut buf = [0u8; 512];
        r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&b| b == 2), "sector 2's bytes");
    }

    /// GET_ID fills the chain's data as one byte stream, across its
    /// buffers. It wrote only the first data buffer: the driver got a used
    /// length of 3 and 2 bytes of the id for a 2 + 18 byte answer.
    #[test]
    fn get_id_fills_every_data_buffer_in_order() {
        let (_t, p) = image(4 * 512);
        let mut r = rig(&p, false);
        let descs = [
            desc(HDR, 16, N, 1),
            desc(DATA, 2, N | W, 2),
            desc(DATA + 0x100, 0, N | W, 3),
            desc(DATA + 0x200, 18, N | W, 4),
            desc(STATUS, 1, W, 0),
        ];
        assert_eq!(r.submit(8, 0, &descs), (S_OK, 21));
        let (mut a, mut b) = ([0u8; 2], [0u8; 10]);
        r.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        r.mem
            .read_slice(&mut b, GuestAddress(DATA + 0x200))
            .unwrap();
        assert_eq!((&a, &b), (b"te", b"st-disk-id"));
    }

    /// The device offers `size_max` (with `seg_max`), so that a driver
    /// keeps its requests within the length the device serves.
    #[test]
    fn the_largest_segment_and_their_count_are_offered() {
        let (_t, p) = image(4 * 512);
        let r = rig(&p, false);
        assert_ne!(r.dev.features() & (1 << F_SIZE_MAX), 0);
        assert_ne!(r.dev.features() & (1 << F_SEG_MAX), 0);
        let (mut size_max, mut seg_max) = ([0u8; 4], [0u8; 4]);
        r.dev.read_config(8, &mut size_max);
        r.dev.read_config(12, &mut seg_max);
        let (size_max, seg_max) = (u32::from_le_bytes(size_max), u32::from_le_bytes(seg_max));
        assert_eq!(size_max, request::SIZE_MAX);
        assert_eq!(
            u64::from(seg_max) * u64::from(size_max),
            request::MAX_DATA_LEN
        );
    }

    #[test]
    fn read_only_drives_refuse_writes() {
        let (_t, p) = image(4 * 512);
        let ro = DiskImage::open(&p, true, "x").unwrap();
        assert!(std::os::unix::fs::FileExt::write_at(&ro.file, &[1], 0).is_err());
        // The device refuses by itself, not through the read-only fd: a
        // rig whose file is writable but whose drive is read-only.
        let mut r = rig(&p, false);
        r.dev.disk.read_only = true;
        assert_ne!(r.dev.features() & (1 << F_RO), 0);
        r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(1, 0, &rw(true, 512)), (S_IOERR, 1));
        assert!(std::fs::read(&p).unwrap()[..512].iter().all(|&b| b == 0));
        // Reads still work.
        assert_eq!(r.submit(0, 1, &rw(false, 512)), (S_OK, 513));
    }

    #[test]
    fn hostile_chains_get_errors_not_crashes() {
        let (_t, p) = image(4 * 512);
        let mut r = rig(&p, false);
        // Past the end of the disk.
        assert_eq!(r.submit(0, 3, &rw(false, 1024)), (S_IOERR, 1));
        // Data buffer outside guest RAM: the whole chain is refused, and
        // nothing (not even the status) is written.
        let (st, len) = r.submit(
            0,
            0,
            &[
                desc(HDR, 16, N, 1),
                desc(0x7fff_0000, 512, N | W, 2),
                desc(STATUS, 1, W, 0),
            ],
        );
        assert_eq!((st, len), (0xff, 0));
        // A loop.
        assert_eq!(
            r.submit(0, 0, &[desc(HDR, 16, N, 1), desc(DATA, 512, N | W, 0)]),
            (0xff, 0)
        );
        // A too-short header.
        assert_eq!(
            r.submit(0, 0, &[desc(HDR, 8, N, 1), desc(STATUS, 1, W, 0)]),
            (S_IOERR, 1)
        );
        // A read into a device-readable buffer (wrong direction).
        assert_eq!(r.submit(0, 0, &rw(true, 512)), (S_IOERR, 1));
        // A write whose status is readable: no status at all.
        assert_eq!(
            r.submit(
                1,
                0,
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 512, N, 2),
                    desc(STATUS, 1, 0, 0)
                ]
            ),
            (0xff, 0)
        );
        assert_eq!(r.dev.counters().malformed, 6);
        assert_eq!(r.dev.counters().ok, 0);
    }

    /// Zero-length buffers pass the chain's RAM check wherever they point;
    /// the device never touches memory through one. A zero-length status
    /// buffer is no status.
    #[test]
    fn zero_length_buffers_touch_nothing() {
        let (_t, p) = image(4 * 512);
        let mut r = rig(&p, false);
        let far = 0xffff_ffff_ffff_f000;
        // A read with an empty data buffer outside RAM before a real one.
        let descs = [
            desc(HDR, 16, N, 1),
            desc(far, 0, N | W, 2),
            desc(DATA, 512, N | W, 3),
            desc(STATUS, 1, W, 0),
        ];
        assert_eq!(r.submit(0, 1, &descs), (S_OK, 513));
        // GET_ID into an empty buffer outside RAM.
        let descs = [
            desc(HDR, 16, N, 1),
            desc(far, 0, N | W, 2),
            desc(STATUS, 1, W, 0),
        ];
        assert_eq!(r.submit(8, 0, &descs), (S_OK, 1));
        // An empty status buffer (outside RAM, or not): no status.
        for at in [far, STATUS] {
            let descs = [desc(HDR, 16, N, 1), desc(at, 0, W, 0)];
            assert_eq!(r.submit(4, 0, &descs), (0xff, 0));
        }
        assert_eq!(r.dev.counters().malformed, 2);
    }

    /// An avail index more than the queue size ahead of the device's is
    /// a driver error that stops the queue (virtio-queue pops nothing
    /// more): it is counted as malformed and logged, not passed over in
    /// silence (virtio-queue's own `log` record goes nowhere).
    #[test]
    fn a_bogus_avail_index_is_counted_and_logged() {
        let (_t, p) = image(4 * 512);
        let mut r = rig(&p, false);
        let vq = virtio_queue::mock::MockSplitQueue::create(&r.mem, GuestAddress(0), 16);
        vq.avail().idx().store(100u16.to_le());
        r.dev.activate(ActiveQueues {
            queues: vec![vq.create_queue().unwrap()],
            mem: r.mem.clone(),
            irq: IrqLine::new(|| Ok(())),
            acked_features: 0,
        });
        assert_eq!(r.dev.process_queue(0), QueueState::NeedsReset);
        assert_eq!(r.dev.counters().malformed, 1);
    }

    #[test]
    fn bad_images_are_clear_errors() {
        let e = DiskImage::open(Path::new("/nonexistent/disk.img"), false, "x").unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot open drive image /nonexistent/disk.img"),
            "{e}"
        );
        let (_t, p) = image(100);
        let e = DiskImage::open(&p, false, "x").unwrap_err();
        assert!(
            e.to_string().contains("smaller than one 512-byte sector"),
            "{e}"
        );
        let e = DiskImage::open(Path::new("/tmp"), true, "x").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let (_t, p) = image(1536 + 100);
        assert_eq!(DiskImage::open(&p, true, "x").unwrap().nsectors(), 3);
    }

    #[test]
    fn after_set_memory_requests_are_served_from_the_new_mapping() {
        let (_t, p) = image(8 * 512);
        let mut r = rig(&p, false);
        // A read of sector 3 waits in the queue of the first mapping.
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        r.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let q = queue_with(&r.mem, 0, &rw(false, 512));
        r.dev.activate(ActiveQueues {
            queues: vec![q],
            mem: r.mem.clone(),
            irq: IrqLine::new(|| Ok(())),
            acked_features: 0,
        });
        // Guest memory moves to another host mapping (relocation): same
        // contents, new host addresses.
        let moved = memory();
        let mut all = vec![0u8; 1 << 20];
        r.mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        moved.write_slice(&all, GuestAddress(0)).unwrap();
        r.dev.set_memory(moved.clone());
        r.dev.process_queue(0);
        let st: u8 = moved.read_obj(GuestAddress(STATUS)).unwrap();
        let mut buf = [0u8; 512];
        moved.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(st, S_OK);
        assert!(
            buf.iter().all(|&b| b == 3),
            "the data landed in the new mapping"
        );
        let old: u8 = r.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(old, 0xff, "the old mapping is not written after the switch");
    }

    /// Memory that can hold `limit` bytes pinned at once: a longer pin
    /// never finds memory. Records the length of every pin.
    struct SmallRam {
        limit: u64,
        pins: std::sync::Mutex<Vec<u64>>,
    }

    impl RamControl for SmallRam {
        fn pin(&self, gpa: u64, len: u64) -> Result<Option<crate::virtio::PinToken>, RamError> {
            self.pins.lock().unwrap().push(len);
            if len > self.limit {
                return Err(RamError::NoMemory { gpa, len });
            }
            Ok(None)
        }
        fn discard(&self, _gpa: u64, _len: u64) -> Result<u64, RamError> {
            unreachable!("a block device discards nothing")
        }
    }

    /// A buffer larger than the memory the VM can have resident at once
    /// is still served: it is pinned and moved 2 MiB-aligned piece by
    /// piece. It was pinned whole, which never found memory: the request
    /// was put back and retried for ever, each retry holding the event
    /// loop for the pin's wait.
    #[test]
    fn a_buffer_larger_than_pinnable_memory_is_served_piece_by_piece() {
        const MIB: u64 = 1 << 20;
        let (_t, p) = image(8 * MIB as usize);
        let disk = DiskImage::open(&p, false, "x").unwrap();
        let ram = Arc::new(SmallRam {
            limit: PIN_CHUNK,
            pins: Default::default(),
        });
        let mut dev = Block::new(disk, ram.clone(), "vda");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // Read sectors 1.. into 5 MiB at 1 MiB + 512 (not chunk aligned).
        let (data, len) = (MIB + 512, 5 * MIB as u32);
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let descs = [
            desc(HDR, 16, N, 1),
            desc(data, len, N | W, 2),
            desc(STATUS, 1, W, 0),
        ];
        dev.activate(ActiveQueues {
            queues: vec![queue_with(&mem, 0, &descs)],
            mem: mem.clone(),
            irq: IrqLine::new(|| Ok(())),
            acked_features: 0,
        });
        assert_eq!(dev.process_queue(0), QueueState::Drained);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        let want: Vec<u8> = (0..len as usize).map(|i| (i / 512 + 1) as u8).collect();
        assert!(buf == want, "the image's bytes from sector 1");
        let pins = ram.pins.lock().unwrap();
        assert!(pins.iter().all(|&n| n <= PIN_CHUNK), "{pins:?}");
        assert_eq!(pins.iter().sum::<u64>(), u64::from(len));
    }

    /// Pins that find no memory the first `short` times, then succeed.
    struct ShortRam(AtomicU32);

    impl RamControl for ShortRam {
        fn pin(&self, gpa: u64, len: u64) -> Result<Option<crate::virtio::PinToken>, RamError> {
            match self.0.load(Ordering::SeqCst) {
                0 => Ok(None),
                n => {
                    self.0.store(n - 1, Ordering::SeqCst);
                    Err(RamError::NoMemory { gpa, len })
                }
            }
        }
        fn discard(&self, _gpa: u64, _len: u64) -> Result<u64, RamError> {
            unreachable!("a block device discards nothing")
        }
    }

    /// A request whose buffer cannot be pinned for lack of memory waits in
    /// the queue, unanswered, and is served when memory comes: the guest
    /// sees a slow request, not an I/O error (it got `S_IOERR`, after up
    /// to 5 s of holding the event loop).
    #[test]
    fn a_request_short_of_memory_waits_instead_of_failing() {
        let (_t, p) = image(8 * 512);
        let disk = DiskImage::open(&p, false, "x").unwrap();
        let ram = Arc::new(ShortRam(AtomicU32::new(2)));
        let mut dev = Block::new(disk, ram.clone(), "vda");
        let mem = memory();
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let irqs = Arc::new(AtomicU32::new(0));
        let i = irqs.clone();
        dev.activate(ActiveQueues {
            queues: vec![queue_with(&mem, 0, &rw(false, 512))],
            mem: mem.clone(),
            irq: IrqLine::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
            acked_features: 0,
        });
        let used = |dev: &Block| dev.active.as_ref().unwrap().queues[0].next_used();
        for round in 1..=2 {
            assert_eq!(dev.process_queue(0), QueueState::Deferred, "round {round}");
            assert_eq!(used(&dev), 0, "unanswered while memory is short");
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
            assert_eq!(irqs.load(Ordering::SeqCst), 0);
            assert_eq!(dev.counters().deferred, round);
        }
        assert_eq!(dev.process_queue(0), QueueState::Drained);
        assert_eq!(used(&dev), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&b| b == 3), "sector 3 was read");
        let c = dev.counters();
        assert_eq!((c.ok, c.errors, c.read_bytes), (1, 0, 512));
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
    }

    /// A wait for guest memory that ends without its request being
    /// served (the driver took the request back) is over: the next wait
    /// is reported (logged) when it starts, and timed from then. The old
    /// wait was kept, so the next one was not logged, and its request
    /// was reported as having waited since the abandoned one began.
    #[test]
    fn a_wait_for_memory_is_reported_from_its_own_start() {
        let (_t, p) = image(8 * 512);
        let disk = DiskImage::open(&p, false, "x").unwrap();
        let ram = Arc::new(ShortRam(AtomicU32::new(1)));
        let mut dev = Block::new(disk, ram.clone(), "vda");
        let mem = memory();
        let q = queue_with(&mem, 0, &rw(false, 512));
        let avail_idx = GuestAddress(q.avail_ring() + 2);
        dev.activate(ActiveQueues {
            queues: vec![q],
            mem: mem.clone(),
            irq: IrqLine::new(|| Ok(())),
            acked_features: 0,
        });
        assert_eq!(dev.process_queue(0), QueueState::Deferred);
        // The driver takes the request back (avail index 1 -> 0).
        mem.write_obj(0u16, avail_idx).unwrap();
        assert_eq!(dev.process_queue(0), QueueState::Drained);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // The same request again, and memory is short again.
        let start = std::time::Instant::now();
        ram.0.store(1, Ordering::SeqCst);
        mem.write_obj(1u16, avail_idx).unwrap();
        assert_eq!(dev.process_queue(0), QueueState::Deferred);
        let since = dev.memory_wait.expect("a request waits");
        assert!(
            since >= start,
            "the wait is timed from {:?} before it began",
            start - since
        );
        assert_eq!(dev.process_queue(0), QueueState::Drained);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(dev.memory_wait, None);

        // The waiting request rewritten into a bad one (past the end of
        // the disk: answered at once with an error), and a new one that
        // waits behind it in the same drain: that wait starts then too.
        let (table, avail) = {
            let q = &dev.active.as_ref().unwrap().queues[0];
            (q.desc_table(), q.avail_ring())
        };
        ram.0.store(1, Ordering::SeqCst);
        mem.write_obj(2u16, avail_idx).unwrap();
        assert_eq!(dev.process_queue(0), QueueState::Deferred);
        std::thread::sleep(std::time::Duration::from_millis(20));
        mem.write_obj(1000u64, GuestAddress(HDR + 8)).unwrap();
        let (hdr, data, status) = (HDR + 0x100, DATA + 0x1000, STATUS + 0x100);
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        for (i, d) in [
            desc(hdr, 16, N, 4),
            desc(data, 512, N | W, 5),
            desc(status, 1, W, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(d, GuestAddress(table + 16 * (3 + i as u64)))
                .unwrap();
        }
        mem.write_obj(3u16, GuestAddress(avail + 4 + 2 * 2))
            .unwrap();
        mem.write_obj(3u16, avail_idx).unwrap();
        let start = std::time::Instant::now();
        ram.0.store(1, Ordering::SeqCst);
        assert_eq!(dev.process_queue(0), QueueState::Deferred);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        let since = dev.memory_wait.expect("a request waits");
        assert!(
            since >= start,
            "the wait behind an answered one is timed from {:?} before it began",
            start - since
        );
    }
}
